"""Sheet + protocol (+ frames on disk) -> a manifest: one validated row per sample.

Data flow::

    sheet --read_sheet--> normalised table --protocol label map--> kept rows
          --apex rules--> fixed/flagged rows --AU parser--> AU columns
          --frames on disk (optional)--> manifest DataFrame + ManifestReport

Validation is never silent. Each rule below is applied to every row, logged, and counted in the
:class:`ManifestReport`:

* ``apex_not_numeric`` (CASME II ``/``) and ``apex_outside_clip`` (apex not in [onset, offset]):
  fixed by ``apex_fix`` (``midpoint``: apex := middle frame, ``apex_source=midpoint``) or dropped
  (``apex_fix="drop"``);
* ``onset_eq_apex``: kept and flagged (no onset->apex motion: flow-based inputs see nothing);
* emotions outside the protocol: dropped and counted per emotion;
* duplicate sample keys, missing frame folders or frames: hard errors naming the sample and path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from famnet_pl.data.au import AUParseError, format_aus, parse_au
from famnet_pl.data.protocols import get_dataset, get_protocol

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "sample_id", "dataset", "subject", "video", "onset", "apex", "offset", "apex_source",
    "emotion", "label", "au_raw", "au_set", "au_unknown", "au_ambiguous", "frame_dir", "n_frames",
    "flags", "sheet_row",
)


class ManifestError(ValueError):
    """A sheet row that cannot become a valid sample (the message names file, row and fix)."""


@dataclass
class ManifestReport:
    """What the builder did, for the validation report and the run logs."""

    sheet: str
    sheet_sha256: str
    protocol: str
    rows_in_sheet: int = 0
    kept: int = 0
    dropped_by_protocol: dict[str, int] = field(default_factory=dict)
    dropped_by_rule: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    frames_checked: bool = False

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [
            f"sheet {self.sheet} (sha256 {self.sheet_sha256[:12]}), protocol {self.protocol}",
            f"  rows in sheet: {self.rows_in_sheet}; kept: {self.kept}",
            f"  dropped by protocol (emotion not in class map): {self.dropped_by_protocol or 'none'}",
            f"  dropped by rule: {len(self.dropped_by_rule)}",
            *(f"    - {m}" for m in self.dropped_by_rule),
            f"  fixed: {len(self.fixed)}",
            *(f"    - {m}" for m in self.fixed),
            f"  flagged (kept): {len(self.flagged)}",
            *(f"    - {m}" for m in self.flagged),
            f"  frames on disk: {'checked' if self.frames_checked else 'not checked (no root given)'}",
        ]
        return "\n".join(lines)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file (sheet provenance goes into the manifest and the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_sheet(protocol: str, root: str | Path | None, annotation: str | Path | None) -> Path:
    """The sheet to read: ``annotation`` if given, else the protocol's pinned sheet in ``root``."""
    if annotation:
        return Path(annotation)
    proto = get_protocol(protocol)
    if root is None:
        raise ManifestError(f"protocol {protocol}: give --data.annotation or --data.data_root")
    return Path(root) / proto.sheet


def _frame_numbers(frame_dir: Path, pattern: str) -> set[int]:
    prefix, suffix = pattern.split("{k}")
    numbers = set()
    for name in os.listdir(frame_dir):
        if name.startswith(prefix) and name.endswith(suffix):
            core = name[len(prefix): len(name) - len(suffix)]
            if core.isdigit():
                numbers.add(int(core))
    return numbers


def build_manifest(
    *,
    protocol: str,
    root: str | Path | None = None,
    annotation: str | Path | None = None,
    apex_fix: Literal["midpoint", "drop"] = "midpoint",
) -> tuple[pd.DataFrame, ManifestReport]:
    """Build and validate the manifest of one protocol.

    Args:
        protocol: protocol name (protocols.py); it names the dataset.
        root: dataset root; when given, every sample's frames are checked on disk.
        annotation: sheet path; default: the protocol's pinned sheet inside ``root``.
        apex_fix: what to do with a non-numeric apex or one outside [onset, offset].

    Returns:
        ``(manifest, report)``; the manifest has :data:`MANIFEST_COLUMNS`, sorted by sample id.

    Raises:
        ManifestError: duplicate samples, or frames on disk that do not match the sheet.
        famnet_pl.data.annotations.SheetError: a malformed sheet.
    """
    proto = get_protocol(protocol)
    spec = get_dataset(proto.dataset)
    sheet = resolve_sheet(protocol, root, annotation)
    table = spec.read_sheet(sheet)
    report = ManifestReport(sheet=str(sheet), sheet_sha256=sha256_file(sheet), protocol=protocol,
                            rows_in_sheet=len(table), frames_checked=root is not None)
    rows = []
    for r in table.itertuples(index=False):
        where = f"{sheet}: row {r.sheet_row} ({r.subject}/{r.video})"
        if r.emotion not in proto.label_map:
            report.dropped_by_protocol[r.emotion] = report.dropped_by_protocol.get(r.emotion, 0) + 1
            continue
        flags, apex, apex_source = [], r.apex, "sheet"
        broken = None
        if pd.isna(apex):
            broken = "apex_not_numeric"
        elif not r.onset <= apex <= r.offset:
            broken = "apex_outside_clip"
        if broken:
            flags.append(broken)
            if apex_fix == "drop":
                report.dropped_by_rule.append(f"{where}: {broken} -> dropped")
                log.warning("%s: %s -> dropped", where, broken)
                continue
            apex, apex_source = (r.onset + r.offset) // 2, "midpoint"
            report.fixed.append(f"{where}: {broken} -> apex := midpoint {int(apex)}")
            log.warning("%s: %s -> apex set to midpoint %d", where, broken, apex)
        if apex == r.onset:
            flags.append("onset_eq_apex")
            report.flagged.append(f"{where}: onset == apex ({int(apex)})")
        try:
            parsed = parse_au(r.au_raw)
        except AUParseError as exc:
            raise ManifestError(f"{where}, column 'Action Units': {exc}") from None
        subject = f"{spec.name}/{r.subject}"
        frame_dir = Path(spec.frames_subdir) / r.subject / r.video
        rows.append({
            "sample_id": f"{subject}/{r.video}", "dataset": spec.name, "subject": subject,
            "video": r.video, "onset": int(r.onset), "apex": int(apex), "offset": int(r.offset),
            "apex_source": apex_source, "emotion": r.emotion,
            "label": proto.classes.index(proto.label_map[r.emotion]),
            "au_raw": parsed.raw, "au_set": format_aus(parsed.aus), "au_unknown": parsed.unknown,
            "au_ambiguous": parsed.ambiguous, "frame_dir": frame_dir.as_posix(),
            "n_frames": int(r.offset - r.onset + 1), "flags": ";".join(flags),
            "sheet_row": int(r.sheet_row),
        })
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    duplicated = manifest[manifest["sample_id"].duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        raise ManifestError(f"{sheet}: row {first.sheet_row}: sample {first.sample_id} appears more than once; "
                            "remove the duplicate row")
    if root is not None:
        check_frames(manifest, root, spec.frame_pattern, sheet)
    report.kept = len(manifest)
    return manifest.sort_values("sample_id", ignore_index=True), report


def check_frames(manifest: pd.DataFrame, root: str | Path, pattern: str, sheet: Path) -> None:
    """Every sample's frames ``onset..offset`` exist under ``root`` (ManifestError otherwise)."""
    for r in manifest.itertuples(index=False):
        frame_dir = Path(root) / r.frame_dir
        where = f"{sheet}: row {r.sheet_row} ({r.sample_id})"
        if not frame_dir.is_dir():
            raise ManifestError(f"{where}: frame folder {frame_dir} does not exist; "
                                "check DATA_ROOT (it must contain the dataset's frame folders)")
        missing = sorted(set(range(r.onset, r.offset + 1)) - _frame_numbers(frame_dir, pattern))
        if missing:
            shown = ", ".join(pattern.format(k=k) for k in missing[:5])
            raise ManifestError(
                f"{where}: {len(missing)} of frames {r.onset}..{r.offset} missing in {frame_dir} "
                f"(e.g. {shown}); the folder does not match the sheet: restore the frames or fix the row"
            )


def manifest_hash(manifest: pd.DataFrame) -> str:
    """Content hash of a manifest (part of every cache key and run record)."""
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()
