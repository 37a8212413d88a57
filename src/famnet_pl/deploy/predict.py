"""``famnet-pl predict MODEL_DIR``: a trained model applied to new clips, with its training
preprocessing.

Data flow::

    --frames DIR | --video FILE | --manifest CSV  ->  ClipSpec (source, onset, apex, offset)
        -> resolve: frame names (folder) or first frame number (video), --spot, range checks
        -> manifest-like row -> preprocess_sample(row, views of preprocess.json)   (data/preprocess.py:
           the same function that fills the training cache: face crop, registration, flow, clip)
        -> MERDataset(stats of preprocess.json, tta of preprocess.json)           (data/datamodule.py)
        -> MERLitModule.predict_step                                               (models/module.py)
        -> one result per clip: predicted class, class and AU probabilities, frames used, warnings

Nothing is re-implemented here: the arrays, the normalisation and the mirrored TTA copy come from
the code the model was trained and scored with (a fold's clips predicted here give its
``predictions.csv`` back; tests/test_deploy.py checks it).

``--spot`` (onset and apex unknown) takes the whole clip as onset..offset and the frame of largest
Farneback motion from the first frame as the apex (frames.peak_motion_frame, the manifest's
``flow_peak`` repair). It assumes one expression per clip, starting at its first frame from a neutral
face; every result it touched carries a warning saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from famnet_pl.data.datamodule import MERDataset
from famnet_pl.data.frames import (
    VIDEO_SUFFIXES,
    FrameError,
    VideoSource,
    clip_times,
    open_frames,
    peak_motion_frame,
)
from famnet_pl.data.preprocess import VIEWS, preprocess_sample
from famnet_pl.data.protocols import get_dataset
from famnet_pl.deploy.bundle import Preprocessing, load_bundle
from famnet_pl.utils.errors import BadInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPOT_WARNING = ("--spot: onset/offset are the clip's first/last frames and the apex its frame of largest "
                "motion from the first (assumes one expression starting from a neutral first frame)")


@dataclass
class ClipSpec:
    """One clip to predict: a frame folder or a video, and its frame numbers (None with ``spot``).
    ``first_frame``: the number of a video's first picture (frame numbers as in the coding sheet)."""

    source: Path
    onset: int | None = None
    apex: int | None = None
    offset: int | None = None
    spot: bool = False
    first_frame: int = 0
    name: str | None = None


def frame_pattern(folder: Path) -> tuple[str, list[int]]:
    """The frame-name pattern of a folder (``img{k}.jpg``, ``{k:05d}.png``) and its frame numbers:
    the most common ``<prefix><number><suffix>`` of its image files."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(p.name for p in folder.iterdir()):
        match = re.fullmatch(r"(.*?)(\d+)(\.[A-Za-z]+)", name)
        if match and match.group(3).lower() in IMAGE_SUFFIXES:
            groups.setdefault((match.group(1), match.group(3)), []).append(match.group(2))
    if not groups:
        raise BadInput(f"{folder}: no numbered frame images ({', '.join(IMAGE_SUFFIXES)}) in this folder; "
                       "give the folder that holds the clip's frames (img46.jpg, ...), or --video")
    (prefix, suffix), digits = max(groups.items(), key=lambda item: len(item[1]))
    widths = {len(d) for d in digits}
    padded = len(widths) == 1 and any(d.startswith("0") for d in digits)
    slot = f"{{k:0{widths.pop()}d}}" if padded else "{k}"
    return f"{prefix}{slot}{suffix}", sorted(int(d) for d in digits)


def _resolve(spec: ClipSpec, pre: Preprocessing) -> tuple[dict, list[str]]:
    """The manifest-like row of a clip and its warnings; BadInput for frame numbers it cannot have."""
    source, warnings = Path(spec.source), []
    label = spec.name or str(source)
    if source.suffix.lower() in VIDEO_SUFFIXES:
        if not source.is_file():
            raise FrameError(f"{source}: video not found; check the path")
        video = VideoSource(source, spec.first_frame)
        first = spec.first_frame
        pattern, last = f"@{first}", first + len(video.reader) - 1
        reader = video
    else:
        if not source.is_dir():
            raise FrameError(f"{source}: no such frame folder (or video: {', '.join(VIDEO_SUFFIXES)}); "
                             "check the path")
        pattern, numbers = frame_pattern(source)
        first, last = numbers[0], numbers[-1]
        reader = None
    onset, apex, offset = spec.onset, spec.apex, spec.offset
    if spec.spot:
        onset = first if onset is None else onset
        offset = last if offset is None else offset
        if apex is None:
            apex = peak_motion_frame(reader or open_frames(source, "", pattern), onset, offset)
        warnings.append(SPOT_WARNING)
    missing = [n for n, v in (("onset", onset), ("apex", apex), ("offset", offset)) if v is None]
    if missing:
        raise BadInput(f"{label}: no {'/'.join(missing)} frame number; give --onset/--apex/--offset (the "
                       "coding sheet's frame numbers) or --spot to estimate them")
    outside = [f"{n} {v}" for n, v in (("onset", onset), ("apex", apex), ("offset", offset))
               if not first <= v <= last]
    if outside:
        raise BadInput(f"{label}: {', '.join(outside)} outside the clip's frames {first}..{last}; fix the "
                       "frame numbers (for a video, --first-frame is the number of its first picture)")
    if not onset <= apex <= offset:
        raise BadInput(f"{label}: needs onset <= apex <= offset, got {onset}, {apex}, {offset}")
    if offset - onset + 1 < pre.min_frames:
        raise BadInput(f"{label}: onset..offset is {offset - onset + 1} frame(s), shorter than the "
                       f"{pre.min_frames} the model needs (its flow runs from the onset to a later frame)")
    if apex == onset:
        warnings.append("apex == onset: the onset->apex flow is zero")
    row = {"sample_id": label, "dataset": pre.dataset, "frame_dir": str(source.resolve()),
           "frame_pattern": pattern, "flow_image": "", "apex_image": "",
           "onset": int(onset), "apex": int(apex), "offset": int(offset)}
    return row, warnings


def _arrays(row: dict, pre: Preprocessing) -> dict[str, np.ndarray]:
    """One clip's arrays, exactly as the training cache holds them; BadInput when no face is found."""
    arrays = preprocess_sample(row, "/", pre.view_config)
    if "face_found" in arrays and not bool(arrays["face_found"]):
        raise BadInput(f"{row['sample_id']}: no face found on frame {row['onset']} (the onset frame, where "
                       f"the {pre.views['face_detector']} detector looks); check the clip shows a face, or "
                       "crop it first")
    return {k: v for k, v in arrays.items() if k in VIEWS}


def predict_clips(model_dir: str | Path, specs: list[ClipSpec], *, batch_size: int = 16,
                  progress: bool | None = None) -> list[dict]:
    """Predict every clip; results in input order (see the module docstring)."""
    module, pre = load_bundle(model_dir)
    if pre.flow_images:
        raise BadInput(f"{model_dir}: trained on precomputed flow images ({pre.protocol}), whose flow cannot "
                       "be made again from frames; predict with a model trained on frames "
                       "(e.g. megc2019_3cls)")
    rows, warnings, per_clip = [], [], []
    show = len(specs) > 1 if progress is None else progress
    bar = tqdm(specs, desc="clips", unit="clip", disable=not show)
    for spec in bar:
        row, notes = _resolve(spec, pre)
        rows.append(row)
        warnings.append(notes)
        per_clip.append(_arrays(row, pre))
    arrays = {k: np.stack([a[k] for a in per_clip]) for k in per_clip[0]}
    n, n_au = len(rows), len(pre.au_vocab)
    dataset = MERDataset(arrays, np.arange(n), np.zeros(n, np.int64), np.zeros((n, n_au), np.float32),
                         np.zeros((n, n_au), np.float32), input_2d=pre.input_2d, clip_mode=pre.clip_mode,
                         stats=pre.stats_arrays(), augment=None, tta=pre.tta)
    probs, au_probs = [], []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            out = module.predict_step(dataset.tensors(range(start, min(n, start + batch_size))))
            probs.append(out["probs"].numpy())
            au_probs.append(out["au_probs"].numpy())
    probs, au_probs = np.concatenate(probs), np.concatenate(au_probs)
    fps = get_dataset(pre.dataset).fps if pre.views.get("clip_fps") else 0
    results = []
    for i, row in enumerate(rows):
        times = clip_times(row["onset"], row["offset"], pre.views["clip_len"], fps=fps,
                           clip_fps=pre.views.get("clip_fps"))
        flow_frames = ([row["onset"], row["apex"]] if pre.views["flow_pair"] == "onset_apex"
                       else [row["apex"], row["offset"]])
        clip_frames = [round(float(t), 3) for t in times] if pre.views["need_clip"] else []
        result = {"clip": row["sample_id"], **{k: row[k] for k in ("onset", "apex", "offset")},
                  "frames_used": {"flow": flow_frames, "clip": clip_frames},
                  "predicted": pre.classes[int(probs[i].argmax())],
                  "probabilities": {c: float(p) for c, p in zip(pre.classes, probs[i])}}
        if pre.trains_au:
            result["au_probabilities"] = {f"AU{a}": float(p) for a, p in zip(pre.au_vocab, au_probs[i])}
        result["warnings"] = warnings[i]
        results.append(result)
    return results


def read_clip_manifest(path: str | Path, *, spot: bool = False) -> list[ClipSpec]:
    """Clips of a CSV: ``clip`` (frame folder or video, relative to the CSV's folder), ``onset``,
    ``apex``, ``offset`` (empty with ``--spot``), optional ``first_frame`` (videos) and ``id``."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"clip": str, "id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the clip list ({type(exc).__name__}); give a CSV with columns "
                       "clip, onset, apex, offset") from None
    if "clip" not in table.columns:
        found = ", ".join(map(str, table.columns))
        raise BadInput(f"{path}: no 'clip' column (found {found}); the columns are "
                       "clip, onset, apex, offset[, first_frame, id]")
    specs = []
    for line, rec in enumerate(table.to_dict(orient="records"), start=2):
        def number(key: str) -> int | None:
            value = rec.get(key)
            if value is None or pd.isna(value):
                return None
            try:
                return int(value)
            except (TypeError, ValueError):
                raise BadInput(f"{path}, line {line}: {key} {value!r} is not a frame number") from None

        source = Path(str(rec["clip"]))
        specs.append(ClipSpec(source if source.is_absolute() else path.parent / source,
                              number("onset"), number("apex"), number("offset"), spot=spot,
                              first_frame=number("first_frame") or 0,
                              name=str(rec["id"]) if "id" in rec and not pd.isna(rec["id"]) else None))
    if not specs:
        raise BadInput(f"{path}: no clips listed")
    return specs


def results_table(results: list[dict]) -> pd.DataFrame:
    """The results as one CSV row per clip (probabilities as ``prob_<class>``, ``au<k>_prob``)."""
    records = []
    for r in results:
        record = {k: r[k] for k in ("clip", "onset", "apex", "offset", "predicted")}
        record |= {f"prob_{c}": p for c, p in r["probabilities"].items()}
        record |= {f"au{a[2:]}_prob": p for a, p in r.get("au_probabilities", {}).items()}
        records.append(record | {"warnings": "; ".join(r["warnings"])})
    return pd.DataFrame(records)
