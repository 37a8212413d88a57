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

from famnet_pl.data.annotations import SheetError


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


# SHA-256 of the official sheet releases the protocols were checked against (counts in
# ../shared/notes/datasets.md); another file is used, but the report says so.
OFFICIAL_SHA256 = {
    "CASME2-coding-20140508.xlsx": "6348c447e3c845ed21889408dbb1f3d9af9402456bd42523c365fdb9fcd07124",
    "CASME2-coding-20190701.xlsx": "6004a3ea87055ef9e6319d59b7940b337dc08e18ac785429c9b851587aa5e090",
    "SAMM_Micro_FACS_Codes_v2.xlsx": "50caea8961cbb8d005669971b87396ac4759bdf45c96637a382c5d9d0894a4a4",
    "MMEW_Micro_Exp_delete_others.csv": "728c6a1cf83ca057d9085ebbd75b5af28eaad7487a1ab10559345b1e22ad7d24",
    "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx":
        "00939efff5cde19b3a7fe0d59476b0f128a50f88ed04b6042d03e04d5915df3c",
    "cas(me)3_part_A_edited.csv": "dea5fc3db1113bf041253d120d0275d50e419976ee2bddb7ff79604f22ae234d",
    "combined_3class_gt.csv": "adf1de4a088d4c3b3bd01cc8d061e836264d0e05140266eb15d8dc1050f484a7",
    "combined_3_class2_for_optical_flow.csv":
        "8ee834b709cc2f89c303c5510ef4993205a1762f2617dd3e5c888baecec588fd",
}


def apply_fixes(dataset: str, table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Apply :data:`KNOWN_FIXES` of ``dataset`` to a normalised sheet table.

    Every fix finds its row by the sheet's *original* key before any cell changes, so fixes of the
    same sample (onset and apex) do not depend on their order.

    Returns:
        The fixed table (a copy) and one report line per applied fix.
    """
    fixes = [f for f in KNOWN_FIXES if f.dataset == dataset]
    hits = []
    for fix in fixes:
        subject, video, onset = fix.key
        hit = ((table["subject"] == subject) & (table["video"].str.lower() == video)
               & (table["onset"] == onset) & (table[fix.column] == fix.wrong))
        hits.append(table.index[hit])
    table, lines = table.copy(), []
    for fix, rows in zip(fixes, hits):
        for i in rows:
            table.loc[i, fix.column] = fix.right
            lines.append(f"row {table.loc[i, 'sheet_row']} ({'/'.join(map(str, fix.key[:2]))}, "
                         f"onset {fix.key[2]}): {fix.column} {fix.wrong} -> {fix.right} [{fix.source}]")
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
        for row, r in enumerate(table.itertuples(index=False), start=2):
            advice = str(r[-1])
            if "去除" not in advice:  # "去除该张" = drop this one; the other advice is a fix (KNOWN_FIXES)
                continue
            try:
                key = (r[0].strip(), r[1].strip().lower(), int(float(r[2])))
            except (AttributeError, ValueError, IndexError):
                raise SheetError(f"{occluded}: row {row}: expected Subject, Filename, Onset; "
                                 f"found {tuple(r)[:3]}; restore the official list or remove it") from None
            ex.drop[key] = f"apex occluded ({occluded.name})"
        ex.applied.append(occluded.name)
    # Lines "spNO.3 J 498.jpg  the image cannot open" and ".../RGB/spNO.138/a/color/1294.jpg".
    for path, target, pattern in ((damaged, ex.damaged, r"(spNO\.\d+)\s+(\w+)\s+(\d+)\.jpg"),
                                  (bad, ex.bad_quality, r"(spNO\.\d+)/(\w+)/color/(\d+)\.jpg")):
        if path.is_file():
            target.update(_frames_by_video(path.read_text(encoding="utf-8", errors="replace").splitlines(),
                                           pattern))
            ex.applied.append(path.name)
    ex.missing = [name for name in _CASME3_LISTS if name not in ex.applied]
    return ex
