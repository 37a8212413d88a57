"""Preprocess once: per-sample arrays cached by content hash, packed into one mmap per config.

Data flow::

    manifest row + ViewConfig --sample_key--> <cache>/samples/<key>.npz    (one per sample: the
        resumable, parallel unit; built by preprocess_sample in worker processes)
    all rows' keys --pack key--> <cache>/packs/<key>/{apex,flow,clip}.npy + meta.json
        (one contiguous memory-mapped array per view for the whole manifest and config: an epoch
        reads contiguous memory; later runs and every fold mmap it)

Per sample (:func:`preprocess_sample`): frames come from a folder or a video file
(frames.open_frames); the face is detected on the onset frame and the same crop (optionally
eye-aligned) is applied to every frame (face.py; ``face_detector="none"`` for frames that are
already cropped); frames are registered to the onset frame; then

* ``apex``  uint8   (S, S, 3)     apex frame, RGB (when the 2D view holds it: ``need_apex``)
* ``flow``  float32 (S, S, 3)     onset->apex (or apex->offset) flow u, v and optical strain, pixels
                                  at size S (frames.onset_apex_flow documents the strain)
Only the views the model reads are built (``need_*``: a 2D-only model gets no clip, a 3D-only one
no 2D view; MERDataModule.use_inputs).

* ``clip``  uint8   (T, s, s, 3)  T frames from onset to offset (frames.clip_times/sample_clip), or
          float32 (T, s, s, 3)  with ``clip_view="flow"``: the flow sequence onset -> frame t (u, v,
                                strain) of those T frames, computed at ``flow_size`` like the 2D flow
                                (frames.flow_sequence): the motion survives at a clip side where
                                0.5-3 px displacements at 128 px would be sub-pixel in the frames

* ``landmarks`` float32 (5, 2)  with a face detector: its five landmarks (eyes, nose tip, mouth
                                corners; face.Landmarks) in the aligned crop, xy normalised to [0, 1]
                                (NaN when the detector gives none): FRL-DGT places its AU regions
                                from them

Precomputed-flow layouts (``flow_image``/``apex_image`` set, MEGC2019's STSTNet images) have no
frames: ``apex`` is the apex crop, ``flow`` the stored image and no clip. The flow images were
written by ``cv2.imwrite`` from a (u, v, strain) array (STSTNet/HTNet code), so OpenCV's own channel
order gives channel 0 = u, 1 = v, 2 = strain (the file's B, G, R planes). Each channel was min-max
normalised to 0..255 per image; it is stored centred, ``value / 255 - 0.5``, so that negating u (the
horizontal flip augmentation) gives exactly the min-max normalisation of the mirrored flow.

A sample key hashes everything that changes its arrays: the sample (id, frame source, frame
range), the size and modification time of every file it reads (its frames onset..offset, its
video, its flow image), every ViewConfig field (detector,
margin, alignment, flow algorithm and pair, sizes, clip sampling) and :data:`CACHE_VERSION` (bump
it when preprocessing code changes). Files are written under temporary names and renamed into
place, so a killed run never leaves an entry that looks complete and the next run resumes.

A sample whose frames are missing or unreadable is not fatal: the error (naming the file) goes
into the result's ``failures`` and the pack leaves the sample out, unless ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from famnet_pl.data.frames import (
    VIDEO_SUFFIXES,
    ClipView,
    FlowAlgorithm,
    FrameError,
    clip_times,
    flow_sequence,
    magnify,
    normalise_motion,
    onset_apex_flow,
    open_frames,
    read_frame,
    register_to,
    resize,
    sample_clip,
)
from famnet_pl.data.protocols import get_dataset
from famnet_pl.utils.io import raise_if_disk_full

log = logging.getLogger(__name__)

CACHE_VERSION = 3
# Arrays packed for training (onset: the pair views only; landmarks: with a face detector).
VIEWS = ("onset", "apex", "flow", "clip", "landmarks")


@dataclass(frozen=True)
class ViewConfig:
    """What to precompute, and how.

    Attributes:
        image_size: side of the 2D views (apex, flow).
        clip_len: frames in the 3D view.
        clip_size: side of the 3D view.
        flow_algorithm: ``tvl1``, ``farneback`` or ``dis``.
        flow_size: side at which flow is computed.
        need_flow: compute the flow view.
        need_onset: keep the onset frame (the ``pair`` 2D views of FRL-DGT).
        need_apex: keep the apex frame (the ``apex``, ``both`` and ``pair`` 2D views).
        register: align every frame to the onset frame (global translation) first.
        need_clip: compute the 3D view (false for datasets without frames).
        face_detector: ``none`` (frames already cropped), ``mtcnn``, ``center`` or a registered one.
        face_margin: margin added around the detected face, as a fraction of its side.
        face_align: rotate so the eyes are level (same transform for every frame).
        face_size: side of the face crop before the views are resized from it.
        flow_pair: ``onset_apex`` (the MER standard) or ``apex_offset``.
        clip_fps: None: time-normalised clips; else frames 1/clip_fps s apart at the dataset's fps.
        clip_view: what the 3D view holds: ``frames`` (RGB) or ``flow`` (onset -> frame t flow and
            strain for each of the T frames).
        flow_norm: ``none`` (flow in pixels at the view's size) or ``sample``: every flow view divided by
            its sample's root-mean-square displacement (frames.normalise_motion; the flow sequence by
            that of the whole sequence, so its time course stays). Precomputed flow images are
            min-max scaled per image already and are kept as they are.
        magnify: motion magnification factor of the RGB views (apex frame, frame clips) against the
            onset frame (frames.magnify; 0: none). Flow is computed on the frames as they are.
    """

    image_size: int = 64
    clip_len: int = 8
    clip_size: int = 48
    flow_algorithm: FlowAlgorithm = "tvl1"
    flow_size: int = 128
    need_flow: bool = True
    need_onset: bool = False
    need_apex: bool = True
    register: bool = True
    need_clip: bool = True
    face_detector: str = "none"
    face_margin: float = 0.15
    face_align: bool = False
    face_size: int = 256
    flow_pair: str = "onset_apex"
    clip_fps: float | None = None
    clip_view: ClipView = "frames"
    flow_norm: Literal["none", "sample"] = "none"
    magnify: float = 0.0


@dataclass
class Prepared:
    """Result of :func:`preprocess`.

    Attributes:
        arrays: ``{"onset", "apex", "flow", "clip"}`` (those computed) memory-mapped, rows = the manifest
            rows that succeeded.
        ok: bool per manifest row: preprocessed (False rows are in ``failures``).
        failures: sample id -> error message naming the file.
        no_face: samples where the face detector found no face (the fallback crop was used).
        built, cached: sample entries computed now / found in the cache.
        seconds: wall time.
    """

    arrays: dict[str, np.ndarray]
    ok: np.ndarray
    failures: dict[str, str] = field(default_factory=dict)
    no_face: list[str] = field(default_factory=list)
    built: int = 0
    cached: int = 0
    seconds: float = 0.0


def _source_files(root: Path, row: dict) -> list[Path]:
    """The files a sample is read from: its frames onset..offset, its video, or its flow/apex images."""
    if not row["frame_dir"]:
        return [root / row["flow_image"], root / row["apex_image"]]
    source = root / row["frame_dir"]
    if row["frame_pattern"].startswith("@") or source.suffix.lower() in VIDEO_SUFFIXES:
        return [source]
    return [source / row["frame_pattern"].format(k=k)
            for k in range(int(row["onset"]), int(row["offset"]) + 1)]


def _source_stamp(root: Path, row: dict) -> list[tuple[int, int] | None]:
    """Size and modification time of every file a sample is read from: a frame edited, truncated or
    replaced in place changes its key (the folder's own time does not change then)."""
    stamps = []
    for path in _source_files(root, row):
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_size, st.st_mtime_ns))
    return stamps


_KEY_FIELDS = ("sample_id", "dataset", "frame_dir", "frame_pattern", "flow_image", "apex_image", "onset",
               "apex", "offset")  # "dataset" also fixes the fps behind clip_fps


def sample_key(row: dict, root: Path, views: ViewConfig, *, _common: str | None = None) -> str:
    """Hash of everything that affects one sample's arrays."""
    common = _common or _common_key(root, views)
    fields = [None if pd.isna(row[k]) else str(row[k]) for k in _KEY_FIELDS]
    payload = json.dumps([common, fields, _source_stamp(root, row)])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _common_key(root: Path, views: ViewConfig) -> str:
    """The part of every sample key shared by a whole run (computed once: the warm path is hot):
    the root, the options, and the code: CACHE_VERSION, the source of the preprocessing modules
    (their constants and algorithm parameters) and the OpenCV version."""
    import cv2

    here = Path(__file__).parent
    sources = ("preprocess.py", "frames.py", "face.py")
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in sources))
    return json.dumps({"root": str(root.resolve()), "views": asdict(views), "version": CACHE_VERSION,
                       "code": code.hexdigest()[:16], "opencv": cv2.__version__}, sort_keys=True)


def preprocess_sample(row: dict, root: str | Path, views: ViewConfig, *,
                      keep_frames: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one manifest row (see the module docstring). Raises FrameError naming the file.
    ``keep_frames`` adds the cropped, registered ``onset_frame`` and ``apex_frame`` (for show.py)."""
    root = Path(root)
    s, c = views.image_size, views.clip_size
    if row["flow_image"]:  # precomputed flow image + apex crop: nothing to compute
        out = {"apex": resize(read_frame(root / row["apex_image"]), s)} if views.need_apex else {}
        if views.need_flow:
            opencv_order = read_frame(root / row["flow_image"])[..., ::-1]  # u, v, strain
            out["flow"] = resize(np.ascontiguousarray(opencv_order), s).astype(np.float32) / 255.0 - 0.5
        return out
    onset_k, apex_k, offset_k = int(row["onset"]), int(row["apex"]), int(row["offset"])
    source = open_frames(root, row["frame_dir"], row["frame_pattern"])
    onset_raw = source.read(onset_k)
    crop, face_found, landmarks = _face_crop(onset_raw, views)
    onset = crop(onset_raw)
    done = {onset_k: onset}  # frame number -> cropped, registered frame: each frame decoded once

    def prepared(ks: list[int]) -> list[np.ndarray]:
        missing = [k for k in dict.fromkeys(ks) if k not in done]
        for k, frame in zip(missing, source.read_many(missing)):
            frame = crop(frame)
            done[k] = register_to(onset, frame) if views.register else frame
        return [done[k] for k in ks]

    (apex,) = prepared([apex_k])
    norm = normalise_motion if views.flow_norm == "sample" else (lambda flow: flow)
    out = {"face_found": np.array(face_found)}
    if views.need_apex:
        out["apex"] = resize(magnify(onset, apex, views.magnify), s)
    if landmarks is not None:
        out["landmarks"] = landmarks
    if views.need_onset:
        out["onset"] = resize(onset, s)
    if keep_frames:
        out |= {"onset_frame": onset, "apex_frame": apex}
    if views.need_flow:
        first, second = (onset, apex) if views.flow_pair == "onset_apex" else (apex, *prepared([offset_k]))
        out["flow"] = norm(onset_apex_flow(first, second, algorithm=views.flow_algorithm,
                                           flow_size=views.flow_size, out_size=s))
    if views.need_clip:
        times = clip_times(onset_k, offset_k, views.clip_len, fps=get_dataset(row["dataset"]).fps,
                           clip_fps=views.clip_fps)
        if views.clip_view == "flow":  # flow from full-resolution frames, then resized to the clip side
            out["clip"] = norm(flow_sequence(sample_clip(prepared, times), algorithm=views.flow_algorithm,
                                             flow_size=views.flow_size, out_size=c))
        else:
            out["clip"] = sample_clip(lambda ks: [resize(magnify(onset, f, views.magnify), c)
                                                  for f in prepared(ks)], times)
    return out


def _face_crop(onset: np.ndarray, views: ViewConfig):
    """The per-frame crop function of a clip, detected once on the onset frame, whether a face was
    found (False: the detector's fallback box; reported by :func:`preprocess`) and the landmarks in
    the crop (None without a detector; NaN when the detector gives none)."""
    if views.face_detector == "none":
        return (lambda frame: frame), True, None
    from famnet_pl.data.face import crop_frames, crop_landmarks, detect_face  # cv2.dnn models only when asked

    box = detect_face(onset, detector=views.face_detector, margin=views.face_margin)
    landmarks = crop_landmarks(box, align=views.face_align)
    return ((lambda frame: crop_frames([frame], box, size=views.face_size, align=views.face_align)[0]),
            box.found, np.full((5, 2), np.nan, np.float32) if landmarks is None else landmarks)


def _entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / "samples" / key[:2] / f"{key}.npz"


def _build_entry(row: dict, root: str, views: ViewConfig, path: str) -> str | None:
    """Worker: compute and atomically write one sample entry; returns an error message or None."""
    try:
        arrays = preprocess_sample(row, root, views)
    except FrameError as exc:
        return str(exc)
    except Exception as exc:  # a corrupt video (decord), an OpenCV error...: this sample, not the run
        source = Path(root) / (row["frame_dir"] or row["flow_image"])
        return (f"{source}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.tmp-{_unique()}.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, target, sum(a.nbytes for a in arrays.values()))
        raise
    return None



def _unique() -> str:
    """Suffix of temporary names: unique across processes and hosts sharing a cache folder."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _worker_init() -> None:
    # One OpenCV thread per worker: N processes x OpenCV's own threads would oversubscribe the cores.
    import cv2

    cv2.setNumThreads(1)


def preprocess(manifest: pd.DataFrame, root: str | Path, views: ViewConfig, cache_dir: str | Path, *,
               workers: int = 0, strict: bool = False, progress: bool = True) -> Prepared:
    """Fill the sample cache for ``manifest`` (in ``workers`` processes) and return the packed arrays.

    Args:
        manifest: rows to preprocess (their order is the pack's row order).
        root: data root.
        views: what to compute.
        cache_dir: cache folder (``samples/`` and ``packs/`` below it).
        workers: worker processes (0 or 1: in this process).
        strict: raise on the first sample that fails instead of reporting it.
        progress: show a progress bar.

    Raises:
        FrameError: with ``strict``, the first failing sample (the message names the file).
    """
    start, root, cache_dir = time.perf_counter(), Path(root), Path(cache_dir)
    rows = [dict(r._asdict()) for r in manifest.itertuples(index=False)]
    common = _common_key(root, views)
    keys = [sample_key(r, root, views, _common=common) for r in rows]
    pack = cache_dir / "packs" / hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    if (pack / "meta.json").is_file():
        meta = json.loads((pack / "meta.json").read_text())
        # Samples that failed are tried again (a restored file does not change the sample key):
        # if one now succeeds, the pack is rebuilt below; otherwise the cached pack stands.
        retry = [i for i, r in enumerate(rows) if r["sample_id"] in meta["failures"]]
        if not any(_build_entry(rows[i], str(root), views, str(_entry(cache_dir, keys[i]))) is None
                   for i in retry):
            if strict and meta["failures"]:
                sample, error = next(iter(meta["failures"].items()))
                raise FrameError(f"sample {sample}: {error}")
            ok = np.array(meta["ok"], dtype=bool)
            return Prepared(_load(pack), ok, meta["failures"], meta["no_face"], 0, int(ok.sum()),
                            time.perf_counter() - start)
        shutil.rmtree(pack, ignore_errors=True)

    todo = [i for i, k in enumerate(keys) if not _entry(cache_dir, k).is_file()]
    failures: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="preprocess", leave=False, disable=not progress or not todo)

    def record(i: int, error: str | None) -> None:
        bar.update(1)
        if error is None:
            return
        if strict:
            raise FrameError(f"sample {rows[i]['sample_id']}: {error}")
        failures[rows[i]["sample_id"]] = error
        log.warning("sample %s left out: %s", rows[i]["sample_id"], error)

    if workers > 1 and not _builtin_detector(views.face_detector):
        log.warning("face detector %r is registered in this process only: preprocessing in-process instead "
                    "of %d workers", views.face_detector, workers)
        workers = 0
    if workers > 1 and len(todo) > 1:
        # forkserver, not fork: OpenCV's thread pool is not fork-safe once this process has used it.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(_build_entry, rows[i], str(root), views,
                                   str(_entry(cache_dir, keys[i]))): i
                       for i in todo}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # strict: stop now, not after the rest
                bar.close()
                raise
    else:
        for i in todo:
            record(i, _build_entry(rows[i], str(root), views, str(_entry(cache_dir, keys[i]))))
    bar.close()
    ok = np.array([row["sample_id"] not in failures for row in rows], dtype=bool)
    if not ok.any():
        sample, error = next(iter(failures.items()))
        raise FrameError(f"every sample failed preprocessing; the first: {sample}: {error}")
    entries = [(r["sample_id"], _entry(cache_dir, k)) for r, k, good in zip(rows, keys, ok) if good]
    no_face = _pack(entries, pack, {"ok": ok.tolist(), "failures": failures, "views": asdict(views),
                                    "sample_ids": [r["sample_id"] for r in rows]})
    if no_face:
        log.warning("no face found in %d samples (fallback crop used): %s", len(no_face), no_face[:10])
    return Prepared(_load(pack), ok, failures, no_face, len(todo) - len(failures),
                    len(rows) - len(todo), time.perf_counter() - start)


def _builtin_detector(name: str) -> bool:
    """Whether worker processes (fresh imports) know the detector: built in, or "none"."""
    if name == "none":
        return True
    from famnet_pl.data.face import BUILTIN_DETECTORS

    return name in BUILTIN_DETECTORS


def _pack(entries: list[tuple[str, Path]], pack: Path, meta: dict) -> list[str]:
    """Concatenate sample entries into one .npy per view (written under a temporary name); returns
    the samples whose face was not found (also stored in ``meta.json``)."""
    tmp = pack.with_name(f"{pack.name}.tmp-{_unique()}")
    tmp.mkdir(parents=True)
    no_face = []
    with np.load(entries[0][1]) as first:
        names = [n for n in first.files if n in VIEWS]
        shapes, dtypes = {n: first[n].shape for n in names}, {n: first[n].dtype for n in names}
    try:
        outs = {n: np.lib.format.open_memmap(tmp / f"{n}.npy", mode="w+", dtype=dtypes[n],
                                             shape=(len(entries), *shapes[n])) for n in names}
        for i, (sample_id, entry) in enumerate(entries):
            with np.load(entry) as arrays:
                for n in names:
                    outs[n][i] = arrays[n]
                if "face_found" in arrays.files and not bool(arrays["face_found"]):
                    no_face.append(sample_id)
        for array in outs.values():
            array.flush()
        (tmp / "meta.json").write_text(json.dumps({**meta, "no_face": no_face}))
        for path in tmp.iterdir():  # on disk before the pack is renamed into place
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException as exc:  # a full disk (or a kill) leaves no half-written pack behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, pack,
                           sum(len(entries) * int(np.prod(shapes[n])) * dtypes[n].itemsize for n in names))
        raise
    try:
        os.replace(tmp, pack)
    except OSError as exc:  # another process (a parallel fold) finished the same pack first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (pack / "meta.json").is_file():
            raise_if_disk_full(exc, pack, 0)
            raise
    return no_face


def _load(pack: Path) -> dict[str, np.ndarray]:
    # Copy-on-write maps: the pack on disk never changes, and a sample's rows become tensors without
    # a copy (torch refuses read-only memory); nothing writes to them (a write would stay private).
    return {n: np.load(pack / f"{n}.npy", mmap_mode="c") for n in VIEWS if (pack / f"{n}.npy").is_file()}
