"""Fake dataset trees in the exact on-disk layout and sheet format of the licensed ME datasets.

The real frames of CASME II, SAMM, MMEW, CAS(ME)^3 and SMIC cannot ship with the repo, yet the
loaders, manifests and ``make loso DATASET=x DATA_ROOT=<tree>`` must be testable end to end. This
module writes tiny trees that a loader cannot tell apart from the real ones by *format*: same
folder and file names, same sheet file names, worksheet names, preamble rows, column names and
order, cell types and id spellings (copied from the real sheets listed in
``shared/annotations/README.md``; nothing is read from there at run time). Data flow::

    fabricate(dataset, root, subjects, per_class, ...)
      |- _plan: every subject gets per_class samples of EVERY emotion of the dataset, so every
      |         class of every protocol has samples; onset = 40 + step * i (MMEW: 1, its clips
      |         are pre-trimmed), apex = onset + n_frames // 2, offset = onset + n_frames - 1
      |- _clip: smooth random background per subject + one bright Gaussian blob that moves from
      |         onset to apex in a class-dependent direction (1-2 px/frame) and back by the
      |         offset, so a model can learn a little from onset -> apex motion
      |- frames: JPEG quality 95 (SAMM greyscale, SMIC .bmp, CAS(ME)^3 depth 16-bit PNG)
      '- sheets: .xlsx via openpyxl (cell types as in the real sheets), .csv via the csv module

Composite roots: ``megc2019`` = ``casme2/ samm/ smic/`` + the official-style list
``combined_3class_gt.csv``; ``famnet`` = ``casme2/ samm/ mmew/``; ``megc2019_flow`` = the
precomputed-flow distribution (28x28 flow PNGs, apex crops, ``combined_3_class2_for_optical_flow.csv``).

Everything is drawn from ``np.random.default_rng([seed, crc32(dataset), subject, sample])``, JPEGs are
written with a fixed quality and the .xlsx zip entries and document timestamps are pinned, so the
same arguments give byte-identical files (on the same OpenCV/zlib build).

Format choices where the real data leaves room (see also ``shared/notes/datasets.md``):

* CASME II ``Subject`` and SAMM ``Subject`` are *text* cells (``'01'``, ``'006'``, number format
  ``@``) as in the real sheets; ``pd.read_excel`` turns both into ints unless given a ``dtype``.
* CAS(ME)^3 ``Onset/Apex/Offset`` are text cells (``'355'``) as in the real sheet.
* SAMM ``Duration`` is a plain int (the real sheet holds a formula whose cached value pandas reads;
  openpyxl cannot write a cached value, and a bare formula would read as NaN).
* ``MMEW_Micro_Exp.xlsx`` (not public) is a guess: worksheet ``Sheet1``, the CSV's first 8 columns,
  bare-number AUs stored as numbers; ``others`` has emotion code 04 in ``S01-04-001`` (the gap
  between the real codes 01-03 and 05-07).
* Flow PNGs are written as STSTNet/HTNet write them: ``cv2.imwrite`` of a (u, v, strain) array, each
  channel min-max normalised to 0-255, so ``cv2.imread`` returns (u, v, strain) (the file's B, G, R).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import string
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openpyxl

DATASETS = ("casme2", "samm", "mmew", "casme3", "smic", "megc2019", "famnet", "megc2019_flow")
LAYOUTS = ("raw", "cropped")  # "cropped" only changes the CASME II frame tree

# --- file names (as the real releases spell them) ---------------------------------------------
CASME2_SHEET, CASME2_SHEET_2019 = "CASME2-coding-20140508.xlsx", "CASME2-coding-20190701.xlsx"
SAMM_SHEET = "SAMM_Micro_FACS_Codes_v2.xlsx"
MMEW_CSV, MMEW_SHEET = "MMEW_Micro_Exp_delete_others.csv", "MMEW_Micro_Exp.xlsx"
CASME3_SHEET, CASME3_EDITED_CSV = "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", "cas(me)3_part_A_edited.csv"
MEGC_LIST, MEGC_FLOW_CSV = "combined_3class_gt.csv", "combined_3_class2_for_optical_flow.csv"
FLOW_DIR, APEX_DIR = "STSNet_whole_norm_u_v_os", "combined_datasets_whole"
CASME2_FRAMES = {"raw": ("CASME2_RAW_selected", "img{k}.jpg"), "cropped": ("Cropped", "reg_img{k}.jpg")}

# --- columns ------------------------------------------------------------------------------------
# None = the real sheet's blank, unnamed column (pandas: "Unnamed: 2", "Unnamed: 6").
CASME2_COLUMNS = ("Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None,
                  "Action Units", "Estimated Emotion")
SAMM_COLUMNS = ("Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame",
                "Duration", "Micro", "Action Units", "Estimated Emotion", "Objective Classes", "Notes")
MMEW_COLUMNS = ("Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units",
                "Estimated Emotion", "remarks")
MMEW_DERIVED = ("label", "one_hot_label", "imagename")  # HTNet's additions in the CSV only
CASME3_COLUMNS = ("Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion")
CASME3_EDITED_EXTRA = ("label_for_7", "label_for_3", "imagename_apex", "imagename_onset",
                       "imagename_apex_offset")  # sic: the real column holds the offset frame
MEGC_FLOW_COLUMNS = ("dataset", "sub", "filename_o", "label", "apex", "imagename", "sub_filename")

# SAMM MICRO_ONLY rows 1-13 (citation + symbol key) as (column index, text); header on row 14.
SAMM_PREAMBLE: tuple[tuple[tuple[int, str], ...], ...] = (
    ((0, "SAMM Dataset - Master FACS Codes"),
     (4, "(Note to the users: If you're using SAMM, please cite: Davison, A. K., Lansley, C., Costen, N., "
         "Tan, K., & Yap, M. H. (2016). SAMM: A spontaneous micro-facial movement dataset. IEEE "
         "Transactions on Affective Computing.)")),
    (),
    ((0, "9/9/17 - New updates with Emotional and Objective Classes. For details please refer to: "),
     (8, "arXiv preprint arXiv:1708.07549.")),
    ((4, "(Note to the users: if you're using the emotional or objective classes, please cite: Davison, "
         "A. K., Merghani, W., & Yap, M. H. (2017). Objective Classes for Micro-Facial Expression "
         "Recognition. arXiv preprint arXiv:1708.07549.)"),),
    (),
    ((0, "Symbol Key:"),),
    ((0, '"/" = or'),),
    ((0, '"?" = some AU\'s continue for a while and have unclear offset'),),
    (),
    ((0, "AU Help:"),),
    ((0, '"L2 or R2" = Unilateral AU 2 on left side of face / right side of face'),),
    ((0, '"A2" = Asymmetric AU 2. Occurs on both sides of face but stronger on one side'),),
    (),
)

# --- emotions and their Action Units cells, in each sheet's own spelling and AU grammar ----------
# Key order = emotion order of the dataset; a sample takes variant (subject + j) % len.
CASME2_AUS: dict[str, tuple[int | str, ...]] = {  # ints and strings mixed, as in the real sheet
    "happiness": (12, "6+12", "R12"), "surprise": ("1+2", 1, "L1+L2"), "disgust": ("4+L10", 4, "4+9"),
    "repression": (15, "12+15", 14), "others": (4, 18, "1+L2"), "sadness": ("1+4+15", 17),
    "fear": ("1+2+4", 20)}
SAMM_AUS: dict[str, tuple[int | str, ...]] = {  # capitalised, "Other" singular; intensity letters
    "Anger": ("4+7", 4, "4+7+43"), "Contempt": ("R14", "L12A"), "Disgust": ("9", "4+9B"),
    "Fear": ("20", "4+20B"), "Happiness": ("12B", 12, "6+12"), "Sadness": ("15A+17", "1+4+15"),
    "Surprise": ("1+2", "1+2+5B"), "Other": (43, "R2", 5)}
MMEW_AUS: dict[str, tuple[str, ...]] = {  # key order = emotion code order 01..07 of "S01-01-001"
    "happiness": ("6+12", "12", "12L"), "surprise": ("1+2", "5", "1+2+5"), "disgust": ("4+9", "R10"),
    "others": ("5+38", "18"), "fear": ("4+5", "20"), "sadness": ("R15+17", "4+15"), "anger": ("4+7", "4+R7")}
MMEW_CODES = {e: code for code, e in enumerate(MMEW_AUS, start=1)}
MMEW_LABELS = ("happiness", "surprise", "sadness", "disgust", "fear", "anger")  # HTNet label 1..6
CASME3_AUS: dict[str, tuple[str, ...]] = {  # all text cells in the real sheet
    "disgust": ("4", "4+7"), "surprise": ("5", "26+25"), "fear": ("18", "4+5"), "anger": ("4+7", "R10"),
    "sad": ("15", "1+4"), "happy": ("R12", "12"), "others": ("38", "24")}
CASME3_LABEL7 = {"happy": 1, "surprise": 2, "sad": 3, "disgust": 4, "fear": 5, "anger": 6}
SMIC_CODES = {"negative": "ne", "positive": "po", "surprise": "sur"}
MEGC_CLASSES = ("negative", "positive", "surprise")
# Emotion -> MEGC2019 label (0 negative, 1 positive, 2 surprise); emotions not listed are not in the list.
MEGC_LABELS: dict[str, dict[str, int]] = {
    "casme2": {"disgust": 0, "repression": 0, "happiness": 1, "surprise": 2},
    "samm": {"Anger": 0, "Contempt": 0, "Disgust": 0, "Fear": 0, "Sadness": 0, "Happiness": 1, "Surprise": 2},
    "smic": {"negative": 0, "positive": 1, "surprise": 2},
}

_CANON = {"happy": "happiness", "positive": "happiness", "sad": "sadness", "other": "others"}
# Objective class per (canonical) emotion: the real sheets derive it from the AUs; a fixed value
# per emotion keeps the column well-formed.
_OBJECTIVE = {"happiness": 1, "surprise": 2, "anger": 3, "contempt": 4, "disgust": 4, "repression": 5,
              "fear": 5, "sadness": 6, "others": 7}
_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")
# Blob motion (direction in degrees, speed in px/frame) per canonical emotion. The MEGC groups get
# separated directions (positive 0, surprise 120, negative 200-300) so composites stay learnable;
# negatives differ among themselves by a little angle and speed.
_MOTION = {"happiness": (0, 1.5), "others": (60, 1.0), "surprise": (120, 1.5), "disgust": (200, 1.0),
           "repression": (220, 2.0), "anger": (240, 1.0), "negative": (240, 1.5), "contempt": (260, 2.0),
           "fear": (280, 1.0), "sadness": (300, 2.0)}
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 95]
_XLSX_TIME = (1980, 1, 1, 0, 0, 0)  # pinned zip-entry time: same args -> same .xlsx bytes


class _Text(str):
    """A cell the real sheet stores as text with number format ``@`` (``'01'``, ``'006'``)."""


@dataclass(frozen=True)
class _Spec:
    """The size arguments of :func:`fabricate`, passed down unchanged to every part."""

    subjects: int
    per_class: int
    n_frames: int
    size: int
    seed: int
    layout: str


@dataclass(frozen=True)
class _Sample:
    """One fabricated ME: ``subject``/``index`` are 0-based, ``j`` is the repeat within its emotion."""

    subject: int
    index: int
    j: int
    emotion: str
    video: str
    onset: int
    apex: int
    offset: int


# --- planning and rendering ----------------------------------------------------------------------


def _plan(spec: _Spec, emotions: Sequence[str], video: Callable[[int, int, str, int], str], *,
          pretrimmed: bool = False) -> list[_Sample]:
    """Samples for every subject x emotion x repeat, with frame ranges.

    Args:
        spec: sizes.
        emotions: the dataset's emotion words, in sheet spelling.
        video: ``(subject, index, emotion, j) -> Filename``.
        pretrimmed: clips start at frame 1 (MMEW) instead of 40 + step * index.
    """
    # Onsets never 1 (a loader must not assume it) and far enough apart that two MEs sharing a
    # CAS(ME)^3 video never share a frame.
    step = max(10, spec.n_frames + 4)
    out = []
    for s in range(spec.subjects):
        pairs = [(e, j) for e in emotions for j in range(spec.per_class)]
        for i, (e, j) in enumerate(pairs):
            onset = 1 if pretrimmed else 40 + step * i
            out.append(_Sample(s, i, j, e, video(s, i, e, j), onset, onset + spec.n_frames // 2,
                               onset + spec.n_frames - 1))
    return out


def _rng(spec: _Spec, dataset: str, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, zlib.crc32(dataset.encode()), *key])


def _motion(emotion: str) -> np.ndarray:
    """Blob velocity (dx, dy) in px/frame for an emotion word of any dataset."""
    word = emotion.lower()
    angle, speed = _MOTION[_CANON.get(word, word)]
    return speed * np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])


def _clip(spec: _Spec, dataset: str, x: _Sample) -> np.ndarray:
    """Frames onset..offset of one sample as uint8 BGR, shape (n_frames, size, size, 3).

    Background: 4x4 random colours upsampled bicubically (smooth, one per subject, so identity is
    constant across a subject's clips). Blob: Gaussian, sigma ~size/20, starting near the centre
    (per-sample jitter), displaced by ``velocity * t`` up to the apex and back to 0 at the offset.
    """
    size, n = spec.size, spec.n_frames
    low = _rng(spec, dataset, x.subject).uniform(40, 160, (4, 4, 3)).astype(np.float32)
    background = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    start = size / 2 + _rng(spec, dataset, x.subject, x.index + 1).uniform(-1, 1, 2) * size / 8
    t_apex = x.apex - x.onset
    t = np.arange(n, dtype=np.float64)
    travel = np.where(t <= t_apex, t, t_apex * (n - 1 - t) / max(1, n - 1 - t_apex))
    centres = start + travel[:, None] * _motion(x.emotion)  # (n, 2) as (x, y)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sigma = max(1.5, size / 20)
    blob = np.exp(-((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2)
                  / (2 * sigma ** 2))
    return np.clip(background + 110 * blob[..., None], 0, 255).astype(np.uint8)


def _imwrite(path: Path, image: np.ndarray) -> None:
    """Write one image; JPEG at a fixed quality so repeated runs give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), image, _JPEG if path.suffix == ".jpg" else [])
    if not ok:
        raise OSError(f"{path}: cv2.imwrite failed")


def _write_clip(spec: _Spec, dataset: str, x: _Sample, folder: Path, pattern: str, *, grey: bool = False,
                depth: Path | None = None) -> None:
    """Write frames ``folder/pattern.format(k=...)`` for k = onset..offset.

    ``grey``: single-channel frames (SAMM). ``depth``: also write 16-bit depth PNGs ``{k}.png``
    there (CAS(ME)^3), in millimetres, the blob nearer the camera.
    """
    for t, frame in enumerate(_clip(spec, dataset, x)):
        k = x.onset + t
        _imwrite(folder / pattern.format(k=k), cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if grey else frame)
        if depth is not None:
            grey_mm = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.uint16)
            _imwrite(depth / f"{k}.png", (1200 - 2 * grey_mm).astype(np.uint16))


# --- sheet writers -------------------------------------------------------------------------------


def _write_xlsx(path: Path, sheets: dict[str, Sequence[Sequence[object]]]) -> None:
    """Write worksheets (name -> rows; empty list = empty sheet, as the real files carry them).

    ``None`` cells are left out (blank), :class:`_Text` cells get number format ``@``. The zip is
    rewritten with pinned entry times and document dates so the bytes depend only on the content.
    """
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for r, row in enumerate(rows, start=1):
            for c, value in enumerate(row, start=1):
                if value is not None:
                    cell = ws.cell(r, c, str(value) if isinstance(value, _Text) else value)
                    if isinstance(value, _Text):
                        cell.number_format = "@"
    buffer = io.BytesIO()
    wb.save(buffer)
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "docProps/core.xml":  # openpyxl stamps "modified" with the clock
                data = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b"2020-01-01T00:00:00Z", data)
            zout.writestr(zipfile.ZipInfo(info.filename, _XLSX_TIME), data, zipfile.ZIP_DEFLATED)


def _write_csv(path: Path, header: Sequence[str] | None, rows: Sequence[Sequence[object]], *,
               crlf: bool = False) -> None:
    """CSV with ``None`` as empty fields; ``crlf`` mirrors files exported on Windows (MEGC list)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\r\n" if crlf else "\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def _au(table: dict[str, tuple], x: _Sample) -> object:
    variants = table[x.emotion]
    return variants[(x.subject + x.j) % len(variants)]


def _objective(emotion: str) -> int:
    word = emotion.lower()
    return _OBJECTIVE[_CANON.get(word, word)]


# --- one helper per dataset: write frames + sheets under root, return the samples ----------------


def _casme2_video(s: int, i: int, e: str, j: int) -> str:
    return f"EP{i + 2:02d}_{i % 2 + 1:02d}" + ("f" if i % 2 == 0 else "")  # EP02_01f, EP03_02, ...


def _samm_video(s: int, i: int, e: str, j: int) -> str:
    return f"{s + 6:03d}_{i % 7 + 1}_{i // 7 + 2}"  # subject_inducement_n: 006_1_2; inducement 1-7


def _smic_video(s: int, i: int, e: str, j: int) -> str:
    return f"s{s + 1}_{SMIC_CODES[e]}_{j + 1:02d}"  # s1_ne_01 (disk spelling; MEGC says s01_ne_01)


def _casme2(root: Path, spec: _Spec) -> list[_Sample]:
    """CASME II: frames per ``spec.layout`` + the 2014 sheet and the 2019 sheet (+ Objective Classes)."""
    samples = _plan(spec, tuple(CASME2_AUS), _casme2_video)
    folder, pattern = CASME2_FRAMES[spec.layout]
    rows = []
    for x in samples:
        _write_clip(spec, "casme2", x, root / folder / f"sub{x.subject + 1:02d}" / x.video, pattern)
        rows.append([_Text(f"{x.subject + 1:02d}"), x.video, None, x.onset, x.apex, x.offset, None,
                     _au(CASME2_AUS, x), x.emotion])
    _write_xlsx(root / CASME2_SHEET, {"Sheet1": [CASME2_COLUMNS, *rows], "Sheet2": [], "Sheet3": []})
    rows_2019 = [[*r, _objective(r[-1])] for r in rows]
    _write_xlsx(root / CASME2_SHEET_2019, {"Sheet1": [(*CASME2_COLUMNS, "Objective Classes"), *rows_2019],
                                           "Sheet2": [], "Sheet3": []})
    return samples


def _samm(root: Path, spec: _Spec) -> list[_Sample]:
    """SAMM: greyscale ``006/006_1_2/006_{k:05d}.jpg`` + MICRO_ONLY sheet (13 preamble rows)."""
    samples = _plan(spec, tuple(SAMM_AUS), _samm_video)
    preamble = [[dict(row).get(c) for c in range(len(SAMM_COLUMNS))] for row in SAMM_PREAMBLE]
    rows = []
    for x in samples:
        sid = f"{x.subject + 6:03d}"
        _write_clip(spec, "samm", x, root / sid / x.video, sid + "_{k:05d}.jpg", grey=True)
        rows.append([_Text(sid), x.video, int(x.video.split("_")[1]), x.onset, x.apex, x.offset,
                     x.offset - x.onset + 1, "Micro - 1/2", _au(SAMM_AUS, x), x.emotion,
                     _objective(x.emotion), "While blinking" if x.index % 4 == 1 else None])
    _write_xlsx(root / SAMM_SHEET, {"MICRO_ONLY": [*preamble, SAMM_COLUMNS, *rows]})
    return samples


def _mmew(root: Path, spec: _Spec) -> list[_Sample]:
    """MMEW: ``Micro_Expression/<emotion>/S01-01-001/{k}.jpg`` (k from 1) + full .xlsx + HTNet CSV."""
    samples = _plan(spec, tuple(MMEW_AUS), lambda s, i, e, j: f"S{s + 1:02d}-{MMEW_CODES[e]:02d}-{j + 1:03d}",
                    pretrimmed=True)
    full, derived = [], []
    for x in samples:
        _write_clip(spec, "mmew", x, root / "Micro_Expression" / x.emotion / x.video, "{k}.jpg")
        au = _au(MMEW_AUS, x)
        row = [x.subject + 1, x.video, x.onset, x.apex, x.offset, au, x.emotion, None]
        full.append([*row[:5], int(au) if au.isdigit() else au, *row[6:]])
        if x.emotion in MMEW_LABELS:  # the CSV is the sheet minus "others"
            label = MMEW_LABELS.index(x.emotion)
            one_hot = "[" + ",".join("1" if k == label else "0" for k in range(len(MMEW_LABELS))) + "]"
            derived.append([*row, label + 1, one_hot, f"{x.emotion}/{x.video}/{x.apex}.jpg"])
    _write_xlsx(root / MMEW_SHEET, {"Sheet1": [MMEW_COLUMNS, *full]})
    _write_csv(root / MMEW_CSV, (*MMEW_COLUMNS, *MMEW_DERIVED), derived)
    return samples


def _casme3(root: Path, spec: _Spec) -> list[_Sample]:
    """CAS(ME)^3 Part A: two MEs per video (``spNO.1/a/color/{k}.jpg`` + ``depth/{k}.png``), the
    ``label`` sheet and HTNet's 3-class list ``cas(me)3_part_A_edited.csv``."""
    if math.ceil(len(CASME3_AUS) * spec.per_class / 2) > 26:
        raise ValueError("casme3: per_class <= 7 (two MEs per video, videos a-z)")
    samples = _plan(spec, tuple(CASME3_AUS), lambda s, i, e, j: string.ascii_lowercase[i // 2])
    rows, edited = [], []
    for x in samples:
        sid = f"spNO.{x.subject + 1}"
        video_dir = root / sid / x.video
        _write_clip(spec, "casme3", x, video_dir / "color", "{k}.jpg", depth=video_dir / "depth")
        row = [sid, x.video, str(x.onset), str(x.apex), str(x.offset), _au(CASME3_AUS, x),
               _ROMAN[_objective(x.emotion) - 1], x.emotion]
        rows.append(row)
        if x.emotion in CASME3_LABEL7:
            label3 = 1 if x.emotion == "happy" else 2 if x.emotion == "surprise" else 0
            edited.append([sid, x.video, x.onset, x.apex, x.offset, *row[5:], CASME3_LABEL7[x.emotion],
                           label3,
                           *(f"{sid}/{x.video}/color/{k}.jpg" for k in (x.apex, x.onset, x.offset))])
    _write_xlsx(root / CASME3_SHEET, {"label": [CASME3_COLUMNS, *rows], "Sheet1": [], "Sheet3": []})
    _write_csv(root / CASME3_EDITED_CSV, (*CASME3_COLUMNS, *CASME3_EDITED_EXTRA), edited)
    return samples


def _smic(root: Path, spec: _Spec) -> list[_Sample]:
    """SMIC-HS: no sheet, the tree is the annotation: ``HS/s1/micro/negative/s1_ne_01/image{k:06d}.bmp``."""
    samples = _plan(spec, MEGC_CLASSES, _smic_video)
    for x in samples:
        folder = root / "HS" / f"s{x.subject + 1}" / "micro" / x.emotion / x.video
        _write_clip(spec, "smic", x, folder, "image{k:06d}.bmp")
    return samples


def _megc_ids(dataset: str, x: _Sample) -> tuple[str, str, str]:
    """(subject as in combined_3class_gt.csv, ``sub`` of the flow CSV, ``filename``) of one sample.

    SAMM: ``6`` in the list but ``006`` in the flow CSV; SMIC: ``s01`` and ``s01_ne_01`` where the
    disk says ``s1`` and ``s1_ne_01``.
    """
    if dataset == "casme2":
        return f"sub{x.subject + 1:02d}", f"sub{x.subject + 1:02d}", x.video
    if dataset == "samm":
        return str(x.subject + 6), f"{x.subject + 6:03d}", x.video
    sub = f"s{x.subject + 1:02d}"
    return sub, sub, sub + x.video[x.video.index("_"):]


_MEGC_ORDER = ("casme2", "smic", "samm")  # row order of the official lists


def _megc2019(root: Path, spec: _Spec) -> list[_Sample]:
    """MEGC2019 composite: ``casme2/ samm/ smic/`` trees + ``combined_3class_gt.csv`` (no header, CRLF)."""
    parts = {name: _PARTS[name](root / name, spec) for name in ("casme2", "samm", "smic")}
    rows = []
    for name in _MEGC_ORDER:
        for x in parts[name]:
            if x.emotion in MEGC_LABELS[name]:
                subject, _, filename = _megc_ids(name, x)
                rows.append([name, subject, filename, MEGC_LABELS[name][x.emotion]])
    _write_csv(root / MEGC_LIST, None, rows, crlf=True)
    return [x for samples in parts.values() for x in samples]


def _famnet(root: Path, spec: _Spec) -> list[_Sample]:
    """FAMNet composite: ``casme2/ samm/ mmew/`` trees (protocols pick the classes)."""
    return [x for name in ("casme2", "samm", "mmew") for x in _PARTS[name](root / name, spec)]


def _flow_image(spec: _Spec, x: _Sample, key: int) -> np.ndarray:
    """28x28 RGB (u, v, strain) of the onset -> apex motion, each channel min-max scaled to 0-255."""
    n = 28
    rng = _rng(spec, "megc2019_flow", key, x.index + 1)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cx, cy = n / 2 + rng.uniform(-3, 3, 2)
    bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 4.0 ** 2))
    u, v = ((x.apex - x.onset) * _motion(x.emotion))[:, None, None] * bump + rng.normal(0, 0.05, (2, n, n))
    (u_y, u_x), (v_y, v_x) = np.gradient(u), np.gradient(v)
    strain = np.sqrt(u_x ** 2 + v_y ** 2 + 0.5 * (u_y + v_x) ** 2)
    channels = [(c - c.min()) / max(np.ptp(c), 1e-9) * 255 for c in (u, v, strain)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def _megc2019_flow(root: Path, spec: _Spec) -> list[_Sample]:
    """Precomputed-flow MEGC2019: per row one ``<sub>_<filename_o> .png`` (28x28) + one apex crop JPEG."""
    rows, samples = [], []
    video = {"casme2": _casme2_video, "samm": _samm_video, "smic": _smic_video}
    for key, name in enumerate(_MEGC_ORDER):
        for x in _plan(spec, MEGC_CLASSES, video[name]):
            _, sub, filename = _megc_ids(name, x)
            imagename = f"{sub}_{x.video}.jpg"  # disk video name: s01_s1_ne_01.jpg, 006_006_1_2.jpg
            # As the STSTNet/HTNet code does: imwrite of (u, v, strain), so imread returns that order.
            _imwrite(root / FLOW_DIR / f"{sub}_{filename} .png", _flow_image(spec, x, key))
            _imwrite(root / APEX_DIR / imagename, _clip(spec, name, x)[x.apex - x.onset])
            rows.append([name, sub, filename, MEGC_CLASSES.index(x.emotion), None, imagename, None])
            samples.append(x)
    _write_csv(root / MEGC_FLOW_CSV, MEGC_FLOW_COLUMNS, rows)
    return samples


_PARTS: dict[str, Callable[[Path, _Spec], list[_Sample]]] = {
    "casme2": _casme2, "samm": _samm, "mmew": _mmew, "casme3": _casme3, "smic": _smic,
    "megc2019": _megc2019, "famnet": _famnet, "megc2019_flow": _megc2019_flow}


def fabricate(dataset: str, root: str | Path, *, subjects: int = 3, per_class: int = 1, n_frames: int = 6,
              size: int = 48, seed: int = 0, layout: str = "raw") -> Path:
    """Write a fake ``dataset`` tree under ``root`` in the real release's layout and sheet format.

    Every subject gets ``per_class`` samples of every emotion of the dataset; each sample gets
    ``n_frames`` frames of ``size`` x ``size`` px numbered onset..offset as its sheet row says.
    Existing files are overwritten; nothing else under ``root`` is touched.

    Args:
        dataset: one of :data:`DATASETS`.
        root: dataset root (created); composites put their parts in ``root/<dataset>/``.
        subjects: subjects per dataset (per source dataset for ``megc2019_flow``).
        per_class: samples per subject and emotion (per class for ``megc2019_flow``).
        n_frames: frames per clip (apex = onset + n_frames // 2).
        size: frame side in pixels (flow images are always 28x28, as distributed).
        seed: everything is a function of the arguments, so equal calls write equal bytes.
        layout: ``raw`` or ``cropped`` (CASME II ``Cropped/subNN/<video>/reg_img{k}.jpg``; only for
            datasets that contain CASME II).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown dataset or layout, or a size out of range.
    """
    if dataset not in _PARTS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if layout not in LAYOUTS or (layout != "raw" and dataset not in ("casme2", "megc2019", "famnet")):
        raise ValueError(f"layout {layout!r}: use 'raw', or 'cropped' for a dataset containing casme2")
    if subjects < 1 or per_class < 1 or n_frames < 1 or size < 8:
        raise ValueError("need subjects >= 1, per_class >= 1, n_frames >= 1 and size >= 8")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _PARTS[dataset](root, _Spec(subjects, per_class, n_frames, size, seed, layout))
    return root


def main(argv: list[str] | None = None) -> int:
    """CLI: ``famnet-pl fabricate DATASET DIR [--subjects N] [--per-class N] ...``."""
    p = argparse.ArgumentParser(prog="famnet-pl fabricate",
                                description="write a tiny fake dataset tree in a real dataset's format "
                                            "(layout + annotation sheets) for testing loaders")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("root", type=Path)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--per-class", type=int, default=1, help="samples per subject and emotion")
    p.add_argument("--n-frames", type=int, default=6)
    p.add_argument("--size", type=int, default=48, help="frame side in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=LAYOUTS, default="raw", help="CASME II frame tree")
    a = p.parse_args(argv)
    try:
        root = fabricate(a.dataset, a.root, subjects=a.subjects, per_class=a.per_class, n_frames=a.n_frames,
                         size=a.size, seed=a.seed, layout=a.layout)
    except ValueError as exc:
        p.error(str(exc))
    print(f"fabricated {a.dataset} at {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
