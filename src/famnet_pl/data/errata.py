"""Known annotation errors and the official exclusion lists, applied by key, never by row index.

Two kinds of fact live here (../shared/notes/datasets.md, section 5):

* :data:`KNOWN_FIXES`: cell values that are provably wrong, with the corrected value and its
  source (CAS(ME)^3's full coding sheet, or the dataset authors' error list). A fix applies only
  while the cell still holds the wrong value, so a corrected future sheet is left alone.
* Exclusion lists shipped with a dataset (CAS(ME)^3: damaged frames, bad-quality frames, MEs with
  an occluded apex). They are looked up next to the sheet; if a list is absent, the report says it
  was not applied.

Generic content rules (apex outside the clip, onset == apex...) are the manifest builder's; this
module only holds dataset-specific facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Fix:
    """One corrected cell. ``key`` is (subject, video, sheet onset) as the sheet spells them."""

    dataset: str
    key: tuple[str, str, int]
    column: str
    wrong: int
    right: int
    source: str


_FULL = "CAS(ME)3_part_A_v2.xls (full coding sheet)"
KNOWN_FIXES: tuple[Fix, ...] = (
    Fix("casme3", ("spNO.149", "d", 112), "apex", 83, 160, _FULL),
    Fix("casme3", ("spNO.216", "d", 3647), "onset", 3647, 2647, _FULL),
    Fix("casme3", ("spNO.40", "e", 1812), "offset", 0, 1845, _FULL),
    Fix("casme3", ("spNO.40", "e", 2327), "offset", 0, 2403, _FULL),
    # Frame 0.jpg does not exist; the authors' error list says onset and apex +1.
    Fix("casme3", ("spNO.216", "e", 0), "apex", 0, 1, "casme3_partA_error_list_ZhouJu (onset/apex +1)"),
    Fix("casme3", ("spNO.216", "e", 0), "onset", 0, 1, "casme3_partA_error_list_ZhouJu (onset/apex +1)"),
)


def apply_fixes(dataset: str, table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Apply :data:`KNOWN_FIXES` of ``dataset`` to a normalised sheet table.

    Returns:
        The fixed table (a copy) and one report line per applied fix.
    """
    table, lines = table.copy(), []
    for fix in (f for f in KNOWN_FIXES if f.dataset == dataset):
        subject, video, onset = fix.key
        hit = (table["subject"] == subject) & (table["video"] == video) & (table["onset"] == onset)
        if fix.column == "onset":  # the onset is part of the key: match it before it changes
            hit &= table["onset"] == fix.wrong
        hit &= table[fix.column] == fix.wrong
        for i in table.index[hit]:
            table.loc[i, fix.column] = fix.right
            lines.append(f"row {table.loc[i, 'sheet_row']} ({subject}/{video}, onset {onset}): "
                         f"{fix.column} {fix.wrong} -> {fix.right} [{fix.source}]")
    return table, lines


@dataclass
class Exclusions:
    """Exclusion facts for one dataset, read from the lists found next to its sheet.

    Attributes:
        drop: (subject, video, onset) -> reason: samples to drop.
        damaged: (subject, video) -> frame numbers that cannot be read.
        bad_quality: (subject, video) -> frame numbers of poor quality (flagged, kept).
        applied: list file names found and applied; ``missing`` those not found.
    """

    drop: dict[tuple[str, str, int], str]
    damaged: dict[tuple[str, str], set[int]]
    bad_quality: dict[tuple[str, str], set[int]]
    applied: list[str]
    missing: list[str]


_CASME3_LISTS = ("casme3_partA_error_list_ZhouJu.table.csv", "error_info_damaged_image_partA.txt",
                 "image_with_bad_quality_partA.txt")


def _frames_by_video(lines: list[str], pattern: str) -> dict[tuple[str, str], set[int]]:
    found: dict[tuple[str, str], set[int]] = {}
    for line in lines:
        m = re.search(pattern, line)
        if m:
            found.setdefault((m.group(1), m.group(2).lower()), set()).add(int(m.group(3)))
    return found


def read_exclusions(dataset: str, sheet_dir: Path) -> Exclusions:
    """The exclusion lists of ``dataset`` found in ``sheet_dir`` (empty for datasets without)."""
    ex = Exclusions({}, {}, {}, [], [])
    if dataset != "casme3":
        return ex
    occluded, damaged, bad = (sheet_dir / name for name in _CASME3_LISTS)
    if occluded.is_file():
        table = pd.read_csv(occluded, dtype=str)
        for r in table.itertuples(index=False):
            advice = str(r[-1])
            if "去除" in advice:  # "去除该张" = drop this one; the other advice is a fix (KNOWN_FIXES)
                ex.drop[(r[0].strip(), r[1].strip(), int(float(r[2])))] = f"apex occluded ({occluded.name})"
        ex.applied.append(occluded.name)
    # Lines "spNO.3 J 498.jpg  the image cannot open" and ".../RGB/spNO.138/a/color/1294.jpg".
    for path, target, pattern in ((damaged, ex.damaged, r"(spNO\.\d+)\s+(\w+)\s+(\d+)\.jpg"),
                                  (bad, ex.bad_quality, r"(spNO\.\d+)/(\w+)/color/(\d+)\.jpg")):
        if path.is_file():
            target.update(_frames_by_video(path.read_text(encoding="utf-8", errors="replace").splitlines(), pattern))
            ex.applied.append(path.name)
    ex.missing = [name for name in _CASME3_LISTS if name not in ex.applied]
    return ex
