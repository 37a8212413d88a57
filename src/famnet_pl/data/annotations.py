"""Readers for official annotation sheets -> one normalised table.

Every reader returns a DataFrame with the columns of :data:`SHEET_COLUMNS`:
``subject`` (dataset-native id, e.g. ``sub01``), ``video`` (the sheet's Filename), ``onset``,
``apex`` (float; NaN where the sheet holds no number, e.g. CASME II's ``/``), ``offset``,
``au_raw``, ``emotion`` (lower case) and ``sheet_row`` (the 1-based spreadsheet row, so every
later error can point at the row a user must fix).

A malformed sheet raises :class:`SheetError` with one line naming the file, the row, the column and
what to do. Sheet-specific fixes (the CASME II ``/`` apex and friends) are *not* applied here: the
manifest builder applies them visibly and records them in the manifest's ``flags``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SHEET_COLUMNS = ("subject", "video", "onset", "apex", "offset", "au_raw", "emotion", "sheet_row")


class SheetError(ValueError):
    """An annotation sheet that cannot be read as documented."""


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path, header_row: int) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SheetError(
            f"{path}: row {header_row}: missing column(s) {missing}; found {list(df.columns)}. "
            "Point --data.annotation at the official coding sheet or restore the header."
        )


def _frame_column(df: pd.DataFrame, column: str, path: Path, *, allow_text: frozenset[str] = frozenset()):
    """Numeric frame numbers; ``allow_text`` cells become NaN, any other text is an error."""
    values = []
    for sheet_row, cell in zip(df["sheet_row"], df[column]):
        if isinstance(cell, str) and cell.strip() in allow_text:
            values.append(np.nan)
            continue
        try:
            number = float(cell)
        except (TypeError, ValueError):
            number = -1.0  # reported below
        if np.isnan(number) and column == "ApexFrame":
            values.append(number)  # an empty apex is the manifest's to fix or drop, visibly
            continue
        if np.isnan(number) or number < 0 or not number.is_integer():
            raise SheetError(
                f"{path}: row {sheet_row}, column {column!r}: {cell!r} is not a frame number; "
                "correct the cell (frame numbers are non-negative integers)"
            )
        values.append(number)
    return values


def read_casme2_sheet(path: str | Path) -> pd.DataFrame:
    """Read a CASME II coding sheet (2014-05-08, 2019-07-01, or the synthetic set's).

    Args:
        path: the ``.xlsx`` file.

    Returns:
        The normalised table (:data:`SHEET_COLUMNS`). ``Subject`` 1 becomes ``sub01``; ``/`` in
        ``ApexFrame`` becomes NaN (the manifest decides what to do with it).

    Raises:
        SheetError: unreadable file, missing columns, or text in a frame column.
    """
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"{path}: annotation sheet not found; pass --data.annotation FILE or check DATA_ROOT")
    try:
        raw = pd.read_excel(path, engine="openpyxl", dtype={"Filename": str})
    except Exception as exc:  # openpyxl raises many types for a non-xlsx file
        raise SheetError(f"{path}: cannot read as .xlsx ({exc}); give the official CASME II coding sheet") from exc
    _require_columns(raw, ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame",
                           "Action Units", "Estimated Emotion"], path, header_row=1)
    raw = raw.dropna(how="all").copy()
    raw["sheet_row"] = raw.index + 2  # header is spreadsheet row 1
    for column in ("Subject", "Filename", "Estimated Emotion"):
        blank = raw[column].isna() | (raw[column].astype(str).str.strip() == "")
        if blank.any():
            raise SheetError(f"{path}: row {raw.loc[blank, 'sheet_row'].iloc[0]}, column {column!r}: "
                             "empty; fill it in or delete the row")
    subjects = []
    for sheet_row, cell in zip(raw["sheet_row"], raw["Subject"]):
        if isinstance(cell, float) and cell.is_integer():
            cell = int(cell)  # a blank elsewhere in the column turns ints into floats
        text = str(cell).strip().lower().removeprefix("sub")
        if not text.isdigit():
            raise SheetError(f"{path}: row {sheet_row}, column 'Subject': {cell!r} is not a subject number")
        subjects.append(f"sub{int(text):02d}")
    out = pd.DataFrame({
        "subject": subjects,
        "video": raw["Filename"].astype(str).str.strip(),
        "onset": _frame_column(raw, "OnsetFrame", path),
        "apex": _frame_column(raw, "ApexFrame", path, allow_text=frozenset({"/"})),
        "offset": _frame_column(raw, "OffsetFrame", path),
        "au_raw": [("" if pd.isna(c) else str(int(c)) if isinstance(c, float) else str(c).strip())
                   for c in raw["Action Units"]],
        "emotion": raw["Estimated Emotion"].astype(str).str.strip().str.lower(),
        "sheet_row": raw["sheet_row"].astype(int),
    })
    backwards = out[out["onset"] > out["offset"]]
    if len(backwards):
        r = backwards.iloc[0]
        raise SheetError(f"{path}: row {r.sheet_row}: OnsetFrame {int(r.onset)} > OffsetFrame {int(r.offset)}; "
                         "correct the frame range")
    return out.reset_index(drop=True)
