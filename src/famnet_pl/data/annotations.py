"""Readers for official annotation sheets (and sheet-less layouts) -> one normalised table.

Every reader returns a DataFrame with the columns of :data:`SHEET_COLUMNS`:
``subject`` (dataset-native id, normalised: ``sub01``, ``006``, ``S01``, ``spNO.1``, ``s01``),
``video`` (the sheet's Filename), ``onset``, ``apex``, ``offset`` (floats; NaN where the sheet has
no number, e.g. CASME II's ``/`` apex or SMIC's missing apex), ``au_raw``, ``emotion`` (lower case)
and ``sheet_row`` (the 1-based spreadsheet row, so every later error can point at the row a user
must fix). Some readers add columns that a dataset's on-disk layout needs (SMIC's
``disk_subject``; the flow-image list's ``flow_name``, ``imagename`` and source ``dataset``).

A malformed sheet raises :class:`SheetError` with one line naming the file, the row, the column and
what to do. Sheet *content* problems (an apex outside the clip, an onset after the offset, a known
erratum) are not fixed here: the manifest builder fixes or drops them visibly and records them.

Sample lists (MEGC2019, the 687-ME CAS(ME)^3 list) are read by ``read_*_list`` into
``dataset, subject, video, onset, emotion`` rows that select samples of the sheets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

SHEET_COLUMNS = ("subject", "video", "onset", "apex", "offset", "au_raw", "emotion", "sheet_row")

# MEGC2019 label numbers (the official list's last column): 0, 1, 2.
MEGC_LABELS = ("negative", "positive", "surprise")

# Every emotion word each sheet may hold (lower case); any other is a sheet error naming the cell.
EMOTIONS: dict[str, tuple[str, ...]] = {
    "casme2": ("happiness", "surprise", "disgust", "repression", "others", "sadness", "fear"),
    "samm": ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise", "other"),
    "mmew": ("happiness", "surprise", "disgust", "fear", "sadness", "anger", "others"),
    "casme3": ("disgust", "surprise", "fear", "anger", "sad", "happy", "others"),
    "smic": MEGC_LABELS,
    "megc2019_flow": MEGC_LABELS,
}


class SheetError(ValueError):
    """An annotation sheet that cannot be read as documented."""


# --- subject ids: one normalisation per dataset, used by sheets and lists alike ------------------

def _subject_number(value: object, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a blank elsewhere in the column turns ints into floats
    text = re.sub(r"^(sub|s)", "", str(value).strip(), flags=re.IGNORECASE)
    if not text.isdigit():
        raise SheetError(f"{where}: {value!r} is not a subject number")
    return int(text)


def normalise_subject(dataset: str, value: object, where: str = "subject") -> str:
    """The dataset-native subject id in one spelling (``casme2``: 1 -> ``sub01``; ``samm``:
    ``6`` -> ``006``; ``mmew``: 1 -> ``S01``; ``smic``: ``s1`` -> ``s01``; ``casme3``: as is)."""
    if dataset in ("casme2", "synth"):
        return f"sub{_subject_number(value, where):02d}"
    if dataset == "samm":
        return f"{_subject_number(value, where):03d}"
    if dataset == "mmew":
        return f"S{_subject_number(value, where):02d}"
    if dataset == "smic":
        return f"s{_subject_number(value, where):02d}"
    return str(value).strip()


# --- shared helpers ------------------------------------------------------------------------------

def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise SheetError(f"{path}: {what} not found; check DATA_ROOT or give the file (--data.annotation "
                         "FILE; composites: --data.annotations '{casme2: FILE, list: FILE}')")


def _read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    _require_file(path, what)
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, **kwargs)
        return pd.read_excel(path, engine="calamine", **kwargs)  # .xlsx and legacy .xls alike
    except Exception as exc:  # the engines raise many types for a file of the wrong kind
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SheetError(f"{path}: cannot read the {what} ({type(exc).__name__}: {first}); "
                         "give the official file") from exc


def _require_columns(df: pd.DataFrame, columns: Iterable[str], path: Path, header_row: int) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SheetError(
            f"{path}: row {header_row}: missing column(s) {missing}; found {list(df.columns)}. "
            "Point --data.annotation at the official sheet or restore the header."
        )


def _require_filled(df: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    for column in columns:
        blank = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if blank.any():
            raise SheetError(f"{path}: row {df.loc[blank, 'sheet_row'].iloc[0]}, column {column!r}: "
                             "empty; fill it in or delete the row")


def _frame_column(df: pd.DataFrame, column: str, path: Path, *, allow_text: frozenset[str] = frozenset(),
                  allow_blank: bool = False) -> list[float]:
    """Numeric frame numbers; ``allow_text`` cells (and blanks if allowed) become NaN, any other
    text is an error naming the cell."""
    values = []
    for sheet_row, cell in zip(df["sheet_row"], df[column]):
        if isinstance(cell, str) and cell.strip() in allow_text:
            values.append(np.nan)
            continue
        try:
            number = float(cell)
        except (TypeError, ValueError):
            number = -1.0  # reported below
        if np.isnan(number) and allow_blank:
            values.append(number)  # an empty apex is the manifest's to fix or drop, visibly
            continue
        if np.isnan(number) or number < 0 or not number.is_integer():
            raise SheetError(
                f"{path}: row {sheet_row}, column {column!r}: {cell!r} is not a frame number; "
                "correct the cell (frame numbers are non-negative integers)"
            )
        values.append(number)
    return values


def _au_text(cell: object) -> str:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return ""
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))  # Excel hands back 12.0 for an int-typed AU cell
    return str(cell).strip()


def check_emotions(emotions: pd.Series, rows: pd.Series, vocabulary: tuple[str, ...], path: Path,
                   column: str) -> None:
    """Every emotion is a word the dataset uses (a typo is an error, not a silently dropped row)."""
    unknown = ~emotions.isin(vocabulary)
    if unknown.any():
        i = unknown.idxmax()
        raise SheetError(f"{path}: row {rows[i]}, column {column!r}: unknown emotion {emotions[i]!r}; "
                         f"this sheet uses {list(vocabulary)}: correct the cell")


def _normalise(raw: pd.DataFrame, path: Path, dataset: str, *, columns: dict[str, str],
               apex_text: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Sheet rows (with ``sheet_row``) -> :data:`SHEET_COLUMNS`. ``columns`` maps our names
    (subject, video, onset, apex, offset, au, emotion) to the sheet's; emotions are checked against
    ``EMOTIONS[dataset]``."""
    c = columns
    _require_filled(raw, [c["subject"], c["video"], c["emotion"]], path)
    emotions = raw[c["emotion"]].astype(str).str.strip().str.lower()
    check_emotions(emotions, raw["sheet_row"], EMOTIONS[dataset], path, c["emotion"])
    subjects = [normalise_subject(dataset, cell, f"{path}: row {row}, column {c['subject']!r}")
                for row, cell in zip(raw["sheet_row"], raw[c["subject"]])]
    table = pd.DataFrame({
        "subject": subjects,
        "video": raw[c["video"]].astype(str).str.strip(),
        "onset": _frame_column(raw, c["onset"], path),
        "apex": _frame_column(raw, c["apex"], path, allow_text=apex_text, allow_blank=True),
        "offset": _frame_column(raw, c["offset"], path),
        "au_raw": [_au_text(cell) for cell in raw[c["au"]]] if c.get("au") else "",
        "emotion": emotions.to_numpy(),
        "sheet_row": raw["sheet_row"].astype(int).to_numpy(),
    })
    table.attrs["au_column"] = c.get("au", "AU")  # for messages about AU cells downstream
    return table


def _megc_labels(raw: pd.DataFrame, column: str, path: Path) -> list[str]:
    """Class names of a 0/1/2 label column (negative, positive, surprise)."""
    labels = []
    for row, cell in zip(raw["sheet_row"], raw[column]):
        text = str(cell).strip().removesuffix(".0")
        if text not in ("0", "1", "2"):
            raise SheetError(f"{path}: row {row}, column {column!r}: {cell!r} is not 0, 1 or 2 "
                             "(negative, positive, surprise)")
        labels.append(MEGC_LABELS[int(text)])
    return labels


def _check_datasets(raw: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """A list's source-dataset column, lower case, each one of casme2/samm/smic."""
    dataset = raw[column].astype(str).str.strip().str.lower()
    bad = ~dataset.isin(["casme2", "samm", "smic"])
    if bad.any():
        i = bad.idxmax()
        raise SheetError(f"{path}: row {raw.loc[i, 'sheet_row']}, column {column!r}: {raw.loc[i, column]!r} "
                         "is not casme2, samm or smic")
    return dataset


def _with_rows(raw: pd.DataFrame, header_row: int) -> pd.DataFrame:
    """Drop empty rows and number the rest as the spreadsheet does (header on ``header_row``)."""
    raw = raw.dropna(how="all").copy()
    raw["sheet_row"] = raw.index + header_row + 1
    return raw


# --- per-dataset readers -------------------------------------------------------------------------

_CASME2_COLUMNS = {"subject": "Subject", "video": "Filename", "onset": "OnsetFrame", "apex": "ApexFrame",
                   "offset": "OffsetFrame", "au": "Action Units", "emotion": "Estimated Emotion"}


def read_casme2_sheet(path: str | Path) -> pd.DataFrame:
    """Read a CASME II coding sheet (2014-05-08, 2019-07-01, or the synthetic set's).

    ``Subject`` 1 becomes ``sub01``; ``/`` in ``ApexFrame`` becomes NaN (the manifest decides).
    """
    path = Path(path)
    raw = _read_table(path, "CASME II coding sheet", dtype={"Filename": str})
    _require_columns(raw, _CASME2_COLUMNS.values(), path, header_row=1)
    return _normalise(_with_rows(raw, 1), path, "casme2", columns=_CASME2_COLUMNS, apex_text=frozenset({"/"}))


_SAMM_COLUMNS = {"subject": "Subject", "video": "Filename", "onset": "Onset Frame", "apex": "Apex Frame",
                 "offset": "Offset Frame", "au": "Action Units", "emotion": "Estimated Emotion"}


def read_samm_sheet(path: str | Path) -> pd.DataFrame:
    """Read the SAMM FACS-codes sheet (v2: worksheet ``MICRO_ONLY``).

    The header row is *detected* (the first row holding both ``Subject`` and ``Filename``): v2 has
    13 preamble rows, another release has one. Subject ``6`` / ``006`` becomes ``006``.
    """
    path = Path(path)
    grids = _read_table(path, "SAMM FACS-codes sheet", sheet_name=None, header=None, dtype=str)
    sheet = "MICRO_ONLY" if "MICRO_ONLY" in grids else next(iter(grids))
    grid = grids[sheet]
    header = next((i for i, row in grid.iterrows()
                   if {"Subject", "Filename"} <= {str(v).strip() for v in row.values}), None)
    if header is None:
        raise SheetError(f"{path}: sheet {sheet!r} has no header row with 'Subject' and 'Filename'; "
                         "give the official SAMM_Micro_FACS_Codes sheet")
    raw = grid.iloc[header + 1:].reset_index(drop=True)
    raw.columns = [str(v).strip() for v in grid.iloc[header].values]
    _require_columns(raw, _SAMM_COLUMNS.values(), path, header_row=header + 1)
    return _normalise(_with_rows(raw, header + 1), path, "samm", columns=_SAMM_COLUMNS)


def read_mmew_sheet(path: str | Path) -> pd.DataFrame:
    """Read MMEW's micro-expression sheet: the original ``MMEW_Micro_Exp.xlsx`` or the derived
    ``MMEW_Micro_Exp_delete_others*.csv`` (same first columns; derived ones are ignored)."""
    path = Path(path)
    raw = _read_table(path, "MMEW sheet", dtype={"Filename": str})
    _require_columns(raw, _CASME2_COLUMNS.values(), path, header_row=1)
    return _normalise(_with_rows(raw, 1), path, "mmew", columns=_CASME2_COLUMNS)


_CASME3_COLUMNS = {"subject": "Subject", "video": "Filename", "onset": "Onset", "apex": "Apex",
                   "offset": "Offset", "au": "AU", "emotion": "emotion"}


def read_casme3_sheet(path: str | Path) -> pd.DataFrame:
    """Read CAS(ME)^3 Part A's micro-expression label sheet (JpgIndex v2, worksheet ``label``).

    Several MEs share a video, so samples are keyed by (subject, video, onset) downstream. Frame
    numbers are the jpg numbers. ``Others`` and ``others`` are one class, ``J`` and ``j`` one video
    (lower case; the frame folder is matched case-insensitively).
    """
    path = Path(path)
    raw = _read_table(path, "CAS(ME)^3 ME label sheet", sheet_name=0, dtype={"Subject": str, "Filename": str})
    _require_columns(raw, _CASME3_COLUMNS.values(), path, header_row=1)
    table = _normalise(_with_rows(raw, 1), path, "casme3", columns=_CASME3_COLUMNS)
    table["video"] = table["video"].str.lower()  # one video is "J" in the sheet; folders are found case-blind
    return table


def scan_smic(root: str | Path) -> pd.DataFrame:
    """SMIC-HS has no public sheet: its frame tree is the annotation.

    Walks ``<root>/HS/s<N>/micro/<negative|positive|surprise>/<video>/image<6 digits>.bmp``.
    onset/offset are the first/last frame numbers on disk; the apex is not annotated (NaN: the
    manifest uses the midpoint, flagged). ``sheet_row`` numbers the clips in sorted order.
    """
    root = Path(root)
    base = root / "HS"
    if not base.is_dir():
        raise SheetError(f"{base}: SMIC-HS frame tree not found; DATA_ROOT must hold "
                         "HS/s1/micro/<class>/<clip>/")
    rows = []
    for clip in sorted(p for p in base.glob("s*/micro/*/*") if p.is_dir()):
        numbers = sorted(int(m.group(1)) for name in (p.name for p in clip.iterdir())
                         if (m := re.fullmatch(r"image(\d+)\.bmp", name, flags=re.IGNORECASE)))
        if not numbers:
            raise SheetError(f"{clip}: no image<number>.bmp frames; restore the clip or remove the folder")
        disk_subject = clip.parents[2].name
        rows.append({"subject": normalise_subject("smic", disk_subject, str(clip)), "video": clip.name,
                     "onset": float(numbers[0]), "apex": np.nan, "offset": float(numbers[-1]),
                     "au_raw": "", "emotion": clip.parent.name.lower(), "disk_subject": disk_subject})
    if not rows:
        raise SheetError(f"{base}: no clips under s*/micro/<class>/; check DATA_ROOT")
    table = pd.DataFrame(rows)
    table["sheet_row"] = np.arange(1, len(table) + 1)
    check_emotions(table["emotion"], table["sheet_row"], EMOTIONS["smic"], base, "class folder")
    return table


def _smic_video(filename: str) -> str:
    """MEGC spells SMIC clips ``s01_ne_01``; on disk they are ``s1_ne_01``."""
    return re.sub(r"^s0*(\d+)_", r"s\1_", filename.strip())


def read_megc_list(path: str | Path) -> pd.DataFrame:
    """Read the official MEGC2019 3-class list (``combined_3class_gt.csv``: no header,
    ``dataset,subject,filename,label``; or the flow-image CSV with its header)."""
    path = Path(path)
    first = _read_table(path, "MEGC2019 sample list", header=None, nrows=1, dtype=str)
    has_header = str(first.iloc[0, 0]).strip() == "dataset"
    raw = _read_table(path, "MEGC2019 sample list", header=0 if has_header else None, dtype=str)
    raw = raw.iloc[:, :4]
    raw.columns = ["dataset", "subject", "video", "label"]
    raw["sheet_row"] = raw.index + (2 if has_header else 1)
    _require_filled(raw, ["dataset", "subject", "video", "label"], path)
    out = pd.DataFrame({"dataset": _check_datasets(raw, "dataset", path), "video": raw["video"].str.strip(),
                        "onset": np.nan, "emotion": _megc_labels(raw, "label", path),
                        "sheet_row": raw["sheet_row"]})
    out["subject"] = [normalise_subject(d, s, f"{path}: row {row}, column 'subject'")
                      for d, s, row in zip(out["dataset"], raw["subject"], raw["sheet_row"])]
    smic = out["dataset"] == "smic"
    out.loc[smic, "video"] = out.loc[smic, "video"].map(_smic_video)
    # SMIC's folders say s1 where the list says s01 (the layout needs the former).
    out["disk_subject"] = [f"s{int(s[1:])}" if d == "smic" else s
                           for d, s in zip(out["dataset"], out["subject"])]
    return _unique(out, ["dataset", "subject", "video"], path)


def _unique(rows: pd.DataFrame, key: list[str], path: Path) -> pd.DataFrame:
    """A sample list whose keys are unique (a duplicate row is an error naming it)."""
    duplicated = rows.duplicated(key)
    if duplicated.any():
        again = rows.loc[duplicated.idxmax()]
        same = (rows[key] == again[key]).all(axis=1)
        first = rows.loc[same.idxmax(), "sheet_row"]
        raise SheetError(f"{path}: rows {first} and {again['sheet_row']} list the same sample "
                         f"({', '.join(str(again[k]) for k in key)}); remove the duplicate row")
    return rows


def read_casme3_edited_list(path: str | Path) -> pd.DataFrame:
    """Read the published 687-ME CAS(ME)^3 3-class list (``cas(me)3_part_A_edited.csv``)."""
    path = Path(path)
    raw = _read_table(path, "CAS(ME)^3 edited list", dtype={"Subject": str, "Filename": str})
    _require_columns(raw, ["Subject", "Filename", "Onset", "label_for_3"], path, header_row=1)
    raw = _with_rows(raw, 1)
    _require_filled(raw, ["Subject", "Filename"], path)
    out = pd.DataFrame({"dataset": "casme3", "subject": raw["Subject"].str.strip(),
                        "video": raw["Filename"].str.strip().str.lower(),
                        "onset": _frame_column(raw, "Onset", path),
                        "emotion": _megc_labels(raw, "label_for_3", path), "sheet_row": raw["sheet_row"]})
    return _unique(out, ["subject", "video", "onset"], path)


def read_megc_flow_csv(path: str | Path) -> pd.DataFrame:
    """Read the label CSV of the precomputed-flow MEGC2019 layout.

    Header ``dataset,sub,filename_o,label,apex,imagename,sub_filename``. Each row names its flow
    image ``<sub>_<filename_o> .png`` (a space before ``.png``, as distributed) and its apex crop by
    ``imagename`` (SMIC rows: ``s03_s3_ne_01.jpg``, not ``<sub>_<filename_o>``). There are no
    frames: onset/apex/offset are NaN and the source ``dataset`` column is kept (per-dataset scores).
    """
    path = Path(path)
    raw = _read_table(path, "MEGC2019 flow-image label CSV", dtype=str)
    _require_columns(raw, ["dataset", "sub", "filename_o", "label", "imagename"], path, header_row=1)
    raw = _with_rows(raw, 1)
    _require_filled(raw, ["dataset", "sub", "filename_o", "label", "imagename"], path)
    dataset = _check_datasets(raw, "dataset", path)
    video = raw["filename_o"].str.strip()
    return pd.DataFrame({
        "subject": [normalise_subject(d, s, f"{path}: row {row}, column 'sub'")
                    for d, s, row in zip(dataset, raw["sub"], raw["sheet_row"])],
        # SMIC clips named as on disk (s1_ne_01), so sample ids match the frame-based MEGC protocol.
        "video": [_smic_video(v) if d == "smic" else v for d, v in zip(dataset, video)],
        "onset": np.nan, "apex": np.nan, "offset": np.nan, "au_raw": "",
        "emotion": _megc_labels(raw, "label", path),
        "sheet_row": raw["sheet_row"].astype(int),
        "dataset": dataset,
        "flow_name": raw["sub"].str.strip() + "_" + video + " .png",
        "imagename": raw["imagename"].str.strip(),
    }).reset_index(drop=True)
