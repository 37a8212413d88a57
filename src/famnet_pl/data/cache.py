"""Decode once: the model-ready arrays of a whole manifest, cached on disk and memory-mapped.

Data flow::

    manifest + ViewConfig --key--> <cache_dir>/<key>/{apex,flow,clip}.npy + meta.json
                                    (built once for all folds; later runs and folds mmap it)

* ``apex.npy``  uint8   (N, S, S, 3)     apex frame, RGB
* ``flow.npy``  float32 (N, S, S, 3)     onset->apex (u, v, strain), pixels at size S
* ``clip.npy``  uint8   (N, T, s, s, 3)  T frames sampled from onset to offset

Frame paths come from the manifest (``frame_dir`` + ``frame_pattern``, relative to the data root).
Precomputed-flow layouts (``flow_image``/``apex_image`` set, MEGC2019's STSTNet images) have no
frames: ``apex`` is the apex crop, ``flow`` the stored image and no clip. The flow images were
written by ``cv2.imwrite`` from a (u, v, strain) array (STSTNet/HTNet code), so OpenCV's own channel
order gives channel 0 = u, 1 = v, 2 = strain (the file's B, G, R planes). Each channel was min-max
normalised to 0..255 per image; it is stored centred, ``value / 255 - 0.5``, so that negating u (the
horizontal flip augmentation) gives exactly the min-max normalisation of the mirrored flow.

The key hashes everything that changes the arrays: manifest content, dataset root, the frame
folders' modification times, sizes, clip length, flow algorithm and :data:`CACHE_VERSION` (bump it
when the preprocessing code changes).
A cache directory is written under a temporary name and renamed into place, so a killed build
never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from famnet_pl.data.frames import (FlowAlgorithm, clip_indices, onset_apex_flow, read_frame,
                                   register_to, resize)
from famnet_pl.data.manifest import manifest_hash

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class ViewConfig:
    """What to precompute. Sizes are square; ``flow`` is skipped when ``need_flow`` is false;
    ``register`` aligns every frame to the onset frame first (frames.register_to)."""

    image_size: int = 64
    clip_len: int = 8
    clip_size: int = 48
    flow_algorithm: FlowAlgorithm = "tvl1"
    flow_size: int = 128
    need_flow: bool = True
    register: bool = True
    need_clip: bool = True


def cache_key(manifest: pd.DataFrame, root: str | Path, views: ViewConfig) -> str:
    """Hash of everything that affects the cached arrays."""
    # Folder mtimes change when frames are added, removed or the folder is replaced (a regenerated
    # synthetic set, a re-extracted dataset); they are cheap to read, unlike hashing every frame.
    sources = [d or f for d, f in zip(manifest["frame_dir"], manifest["flow_image"])]
    frames = [os.stat(Path(root) / d).st_mtime_ns if (Path(root) / d).exists() else None for d in sources]
    payload = json.dumps({"manifest": manifest_hash(manifest), "root": str(Path(root).resolve()),
                          "frames": frames, "views": asdict(views), "version": CACHE_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _build(manifest: pd.DataFrame, root: Path, views: ViewConfig, out: Path) -> None:
    n = len(manifest)
    s, t, c = views.image_size, views.clip_len, views.clip_size
    apex = np.lib.format.open_memmap(out / "apex.npy", mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    flow = (np.lib.format.open_memmap(out / "flow.npy", mode="w+", dtype=np.float32, shape=(n, s, s, 3))
            if views.need_flow else None)
    clip = (np.lib.format.open_memmap(out / "clip.npy", mode="w+", dtype=np.uint8, shape=(n, t, c, c, 3))
            if views.need_clip else None)
    rows = manifest.itertuples(index=False)
    for i, r in enumerate(tqdm(rows, total=n, desc="decode + flow (once)", leave=False)):
        if r.flow_image:  # precomputed flow image + apex crop: nothing to compute
            apex[i] = resize(read_frame(root / r.apex_image), s)
            if flow is not None:
                bgr_order = read_frame(root / r.flow_image)[..., ::-1]  # OpenCV order: u, v, strain
                flow[i] = resize(np.ascontiguousarray(bgr_order), s).astype(np.float32) / 255.0 - 0.5
            continue
        frame_dir = root / r.frame_dir
        onset = read_frame(frame_dir / r.frame_pattern.format(k=r.onset))

        def frame(k: int) -> np.ndarray:
            image = read_frame(frame_dir / r.frame_pattern.format(k=k))
            return register_to(onset, image) if views.register and k != r.onset else image

        apex_full = frame(r.apex)
        apex[i] = resize(apex_full, s)
        if flow is not None:
            flow[i] = onset_apex_flow(onset, apex_full, algorithm=views.flow_algorithm,
                                      flow_size=views.flow_size, out_size=s)
        if clip is not None:
            clip[i] = np.stack([resize(frame(k), c) for k in clip_indices(r.onset, r.offset, t)])
    for array in (apex, flow, clip):
        if array is not None:
            array.flush()


def load_or_build(manifest: pd.DataFrame, root: str | Path, views: ViewConfig,
                  cache_dir: str | Path) -> dict[str, np.ndarray]:
    """Return the cached arrays of ``manifest`` (memory-mapped), building them on first use.

    Args:
        manifest: rows in the order the arrays should have.
        root: dataset root holding the frame folders.
        views: what to compute.
        cache_dir: parent folder of all caches.

    Returns:
        ``{"apex": ..., "flow": ..., "clip": ...}`` (keys for the views computed).
    """
    root = Path(root)
    final = Path(cache_dir) / cache_key(manifest, root, views)
    if not (final / "meta.json").is_file():
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("building cache %s for %d samples", final, len(manifest))
        _build(manifest, root, views, tmp)
        (tmp / "meta.json").write_text(json.dumps({"views": asdict(views), "n": len(manifest),
                                                   "sample_ids": manifest["sample_id"].tolist()}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process (a parallel fold) finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "meta.json").is_file():
                raise
    return {name: np.load(final / f"{name}.npy", mmap_mode="r")
            for name in ("apex", "flow", "clip") if (final / f"{name}.npy").is_file()}
