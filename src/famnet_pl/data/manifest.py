"""Sheets + protocol (+ files on disk) -> a manifest: one validated row per sample.

Data flow, per dataset part of the protocol::

    sheet --reader--> normalised table --errata (by key)--> --exclusion lists--> --official list /
    label map / protocol drops--> kept rows --range + apex rules--> fixed / flagged / dropped rows
    --AU parser--> AU columns --layout--> frame paths --files on disk (when a root is given)-->
    manifest rows + ManifestReport

Validation is never silent. Each rule is applied to every row, logged, and listed in the
:class:`ManifestReport` (``famnet-pl manifest`` prints it):

==================  ===========================================  ===================================
rule                what                                         handling
==================  ===========================================  ===================================
onset_after_offset  onset > offset after the errata              error naming the row (fix the cell)
apex_not_numeric    apex cell holds no number (CASME II ``/``)   ``apex_fix``: midpoint | flow_peak
apex_outside_clip   apex not in [onset, offset] (SAMM 028_4_1)   (apex re-estimated, flagged) | drop
apex_not_annotated  the dataset has no apex (SMIC)               midpoint | flow_peak, flagged
onset_eq_apex       no onset->apex motion (CAS(ME)^3: 55 MEs)    ``onset_eq_apex``: keep (flagged) |
                                                                 fix (as apex_fix) | drop
apex_eq_offset      apex on the last frame                       flagged
apex_next_to_onset  apex one frame after onset                   flagged (suspicious)
long_clip           longer than 2 s at the dataset's fps         flagged (clips are sampled, not read
                                                                 whole)
unknown emotion     a word the dataset never uses (a typo)       error naming the cell (reader)
protocol emotion    an emotion outside the protocol's classes    dropped, counted per emotion
known errata        wrong cells (errata.KNOWN_FIXES)             fixed by key, listed
official lists      damaged frames / occluded apex (CAS(ME)^3)   dropped, listed; bad quality:
                                                                 flagged
missing frames      files of onset..offset absent on disk        ``missing_frames``: error | drop
duplicate sample    one key twice                                error naming the row
sheet release       SHA-256 differs from the official sheet      warning, and said in the report
==================  ===========================================  ===================================
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from famnet_pl.data import errata
from famnet_pl.data.au import AUParseError, format_aus, parse_au
from famnet_pl.data.protocols import DatasetSpec, Layout, Part, Protocol, get_dataset, get_protocol

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "sample_id", "dataset", "subject", "video", "onset", "apex", "offset", "apex_source",
    "emotion", "label", "au_raw", "au_set", "au_unknown", "au_ambiguous", "frame_dir", "frame_pattern",
    "depth_dir", "flow_image", "apex_image", "n_frames", "flags", "sheet_row",
)
FRAME_COLUMNS = ("onset", "apex", "offset", "n_frames")

ApexFix = Literal["midpoint", "flow_peak", "drop"]


class ManifestError(ValueError):
    """A sheet row that cannot become a valid sample (the message names file, row and fix)."""


@dataclass
class ManifestReport:
    """What the builder did, for the validation report and the run logs."""

    protocol: str
    sheets: dict[str, str] = field(default_factory=dict)          # dataset -> "path (sha256 ...)"
    sheet_hashes: dict[str, str] = field(default_factory=dict)    # dataset -> SHA-256 of its sheet
    layouts: dict[str, str] = field(default_factory=dict)         # dataset -> layout used
    rows_in_sheet: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    dropped_by_protocol: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_by_rule: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped_ids: set[str] = field(default_factory=set)
    frames_checked: bool = False

    @property
    def sheet_sha256(self) -> str:
        """The sheet's SHA-256 (several sheets: a digest of theirs), the manifest's provenance column."""
        if len(self.sheet_hashes) == 1:
            return next(iter(self.sheet_hashes.values()))
        lines = "\n".join(f"{k}:{v}" for k, v in sorted(self.sheet_hashes.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    def _sheet(self, dataset: str, path: Path) -> None:
        digest = sha256_file(path)
        self.sheet_hashes[dataset] = digest
        official = errata.OFFICIAL_SHA256.get(path.name)
        status = ("official release" if digest == official else
                  "DIFFERS from the official release the protocol was checked against" if official else
                  "not a known release")
        self.sheets[dataset] = f"{path} (sha256 {digest[:12]}, {status})"
        if official and digest != official:
            log.warning("%s: sha256 %s differs from the official %s; counts may differ from the published "
                        "ones", path, digest[:12], path.name)

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"protocol {self.protocol}"]
        for dataset, sheet in self.sheets.items():
            if dataset == "list":
                lines.append(f"  official sample list: {sheet}")
                continue
            lines.append(f"  {dataset}: {sheet}; layout {self.layouts.get(dataset, '-')}; rows "
                         f"{self.rows_in_sheet.get(dataset, 0)}; kept {self.kept.get(dataset, 0)}; dropped "
                         f"by protocol {self.dropped_by_protocol.get(dataset) or 'none'}")
        for title, items in (("dropped by rule", self.dropped_by_rule), ("fixed", self.fixed),
                             ("flagged (kept)", self.flagged), ("notes", self.notes)):
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    - {m}" for m in items]
        lines.append("  files on disk: "
                     f"{'checked' if self.frames_checked else 'not checked (no root given)'}")
        lines.append(f"  total kept: {sum(self.kept.values())}")
        return "\n".join(lines)

    def _add(self, kind: str, message: str, sample_id: str | None = None) -> None:
        # Details go to the report (printed by `famnet-pl manifest`, logged once by the DataModule).
        getattr(self, kind).append(message)
        if kind == "dropped_by_rule" and sample_id:
            self.dropped_ids.add(sample_id)
        log.debug("%s: %s", kind, message)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file (sheet provenance goes into the manifest and the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- where things are ----------------------------------------------------------------------------

def part_root(proto: Protocol, dataset: str, root: str | Path | None,
              roots: dict[str, str] | None = None) -> Path | None:
    """A part's dataset root: ``roots[dataset]``, else ``root`` (one dataset) or ``root/<dataset>``
    (a composite's root holds one folder per dataset)."""
    if roots and dataset in roots:
        return Path(roots[dataset])
    if root is None:
        return None
    return Path(root) / dataset if proto.composite else Path(root)


def part_sheet(proto: Protocol, part: Part, root: Path | None, annotation: str | Path | None,
               annotations: dict[str, str] | None = None) -> Path | None:
    """A part's sheet: ``annotations[dataset]``, ``annotation`` (one dataset), else the pinned sheet
    in the part's root. ``None`` for a dataset without a sheet (SMIC: the frame tree is read)."""
    if annotations and part.dataset in annotations:
        return Path(annotations[part.dataset])
    if annotation and not proto.composite:
        return Path(annotation)
    if part.sheet is None:
        return None
    if root is None:
        raise ManifestError(f"protocol {proto.name}: no sheet for {part.dataset}; give --data.annotation "
                            f"(or --data.annotations '{{{part.dataset}: FILE}}') or --data.data_root")
    return root / part.sheet


def _resolve_case(root: Path, relative: str) -> str:
    """``relative`` with each component matched case-insensitively when the exact one is absent
    (CAS(ME)^3 spells one video ``J`` in the sheet)."""
    current, parts = root, []
    for name in Path(relative).parts:
        if not (current / name).exists() and current.is_dir():
            match = next((n for n in os.listdir(current) if n.lower() == name.lower()), name)
            name = match
        parts.append(name)
        current = current / name
    return "/".join(parts)


def _fill(template: str, fields: dict) -> str:
    return template.format(**fields) if template else ""


def _paths(layout: Layout, fields: dict, root: Path | None) -> dict[str, str]:
    """A sample's file locations under ``layout`` (frame pattern keeps its ``{k}`` slot)."""
    paths = {"frame_dir": _fill(layout.frame_dir, fields),
             "frame_pattern": _frame_pattern(layout.frame_pattern, fields),
             "depth_dir": _fill(layout.depth_dir, fields), "flow_image": _fill(layout.flow_image, fields),
             "apex_image": _fill(layout.apex_image, fields)}
    if root is not None:
        paths = {k: _resolve_case(root, v) if v and k != "frame_pattern" else v for k, v in paths.items()}
    return paths


def _frame_pattern(template: str, fields: dict) -> str:
    """Fill a frame-name template except its ``{k...}`` slot: ``{subject}_{k:05d}.jpg`` ->
    ``006_{k:05d}.jpg``."""
    slot = re.search(r"\{k[^}]*\}", template)
    if not slot:
        return template.format(**fields)
    return template[:slot.start()].format(**fields) + slot.group(0) + template[slot.end():].format(**fields)


def _choose_layout(spec: DatasetSpec, layout: str, rows: list[dict], root: Path | None) -> Layout:
    # A named layout applies to the datasets that have it (in a composite, the others detect theirs).
    if layout != "auto" and any(candidate.name == layout for candidate in spec.layouts):
        return spec.layout(layout)
    if root is None or not rows:
        return spec.layouts[0]
    tried, found = [], {}
    for candidate in spec.layouts:
        probes = [_paths(candidate, fields, root) for fields in rows[:20]]
        found[candidate.name] = sum((root / (p["frame_dir"] or p["flow_image"])).exists() for p in probes)
        tried.append(f"{candidate.name}: {root / (probes[0]['frame_dir'] or probes[0]['flow_image'])}")
    best = max(spec.layouts, key=lambda candidate: found[candidate.name])
    if found[best.name]:
        return best  # the layout that holds most samples; the file check names any that are missing
    raise ManifestError(f"{root}: no {spec.name} sample found where any layout puts it (tried "
                        f"{'; '.join(tried)}); DATA_ROOT must be the folder that holds the dataset's "
                        "frame folders (see experiments/data/<dataset>.yaml)")


def frame_numbers(frame_dir: Path, pattern: str) -> set[int]:
    """Frame numbers present in ``frame_dir`` for a filled ``pattern`` (``img{k}.jpg``)."""
    slot = re.search(r"\{k[^}]*\}", pattern)
    regex = re.compile(re.escape(pattern[:slot.start()]) + r"(\d+)" + re.escape(pattern[slot.end():]),
                       re.IGNORECASE)
    return {int(m.group(1)) for name in os.listdir(frame_dir) if (m := regex.fullmatch(name))}


# --- building ------------------------------------------------------------------------------------

def _read_part(spec: DatasetSpec, sheet: Path | None, root: Path | None, proto: Protocol,
               listed: pd.DataFrame | None, report: ManifestReport) -> tuple[pd.DataFrame, str]:
    """The part's normalised table and the name of its source (for messages)."""
    if sheet is not None:
        table = spec.read_sheet(sheet)
        report._sheet(spec.name, sheet)
        return table, str(sheet)
    # No sheet of its own (SMIC): the frame tree, or, without frames, the official list's rows.
    if root is not None and root.is_dir():
        report.sheets[spec.name] = f"{root} (frame tree)"
        return spec.read_sheet(root), str(root)
    if listed is None:
        raise ManifestError(f"protocol {proto.name}: {spec.name} has no sheet; give its root "
                            "(--data.data_root or --data.roots) so the frame tree can be read")
    rows = listed[listed["dataset"] == spec.name].assign(apex=np.nan, offset=np.nan, au_raw="")
    report.sheets[spec.name] = "official sample list only (no frames: frame numbers unknown)"
    return rows.drop(columns="dataset").reset_index(drop=True), "sample list"


def _key(spec: DatasetSpec, subject: str, video: str, onset: float) -> str:
    onset_text = "" if pd.isna(onset) else int(onset)
    return spec.sample_key.format(subject=subject, video=video, onset=onset_text)


def _peak_apex(root: Path, paths: dict[str, str], onset: int, offset: int) -> int:
    from famnet_pl.data.frames import open_frames, peak_motion_frame  # cv2 only when asked for

    return peak_motion_frame(open_frames(root, paths["frame_dir"], paths["frame_pattern"]), onset, offset)


def pinned_sheets(protocol: str, folder: Path) -> dict[str, str]:
    """{dataset or "list": path} of a protocol's pinned files (its sheets, its official list) found
    under ``folder`` (``famnet-pl manifest --sheets-dir``): exactly one of each, or a ManifestError."""
    proto = get_protocol(protocol)
    wanted = {p.dataset: p.sheet for p in proto.parts if p.sheet}
    if proto.sample_list is not None:
        wanted["list"] = proto.sample_list.file
    found = {}
    for key, name in wanted.items():
        hits = sorted(folder.rglob(name)) if folder.is_dir() else []
        if len(hits) != 1:
            raise ManifestError(f"{folder}: {'no' if not hits else len(hits)} files named {name} (the pinned "
                                f"{key} sheet of {protocol}) below it; point --sheets-dir at a folder with "
                                f"exactly one{'' if not hits else ': ' + ', '.join(map(str, hits[:3]))}")
        found[key] = str(hits[0])
    return found


def build_manifest(
    *,
    protocol: str | Protocol,
    root: str | Path | None = None,
    annotation: str | Path | None = None,
    roots: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    sample_list: str | Path | None = None,
    layout: str = "auto",
    apex_fix: ApexFix = "midpoint",
    onset_eq_apex: Literal["keep", "fix", "drop"] = "keep",
    missing_frames: Literal["error", "drop"] = "error",
    drop: list[str] | None = None,
    official_lists: bool = True,
) -> tuple[pd.DataFrame, ManifestReport]:
    """Build and validate the manifest of one protocol (see the module docstring for the rules).

    Args:
        protocol: protocol name or object (protocols.py).
        root: data root: the dataset's folder, or for a composite the folder holding one folder per
            dataset. When given, every sample's files are checked on disk.
        annotation: sheet path (single-dataset protocols); default: the pinned sheet in the root.
        roots: per-dataset roots overriding ``root`` (composites).
        annotations: per-dataset sheet paths overriding the pinned ones (composites).
        sample_list: path of the protocol's official list; default: its pinned name in ``root``.
        layout: on-disk layout (``raw``, ``cropped``, ...); ``auto`` picks the one found on disk.
        apex_fix: non-numeric, out-of-clip or unannotated apex: ``midpoint`` or ``flow_peak`` (the
            frame of largest motion from onset; needs ``root``), flagged; or ``drop``.
        onset_eq_apex: ``keep`` (flagged), ``fix`` (re-estimate as ``apex_fix``) or ``drop``.
        missing_frames: files missing on disk: ``error`` (the default: the tree does not match the
            sheet) or ``drop`` (listed in the report; CAS(ME)^3 misses frames in ~10% of MEs).
        drop: extra sample ids to drop (with the protocol's own drop list).
        official_lists: apply the dataset's official exclusion lists found next to its sheet
            (CAS(ME)^3: occluded apex, damaged frames). ``False`` reproduces lists made without
            them (the 687-ME CAS(ME)^3 list keeps 9 MEs the occlusion list drops).

    Returns:
        ``(manifest, report)``; the manifest has :data:`MANIFEST_COLUMNS`, sorted by sample id,
        frame numbers as nullable integers (NA only where no frames exist or are known).

    Raises:
        ManifestError: duplicate samples, a malformed range, files that do not match the sheet.
        famnet_pl.data.annotations.SheetError: a malformed sheet.
    """
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if apex_fix == "flow_peak" and root is None and not roots:
        raise ManifestError("apex_fix='flow_peak' reads frames: give the data root")
    if layout != "auto" and not any(layout in [x.name for x in get_dataset(d).layouts]
                                    for d in proto.datasets):
        raise ManifestError(f"layout {layout!r} is not a layout of {list(proto.datasets)}; see protocols.py")
    report = ManifestReport(protocol=proto.name, frames_checked=root is not None or bool(roots))
    listed = None
    if proto.sample_list is not None:
        path = Path(sample_list) if sample_list else (Path(root) / proto.sample_list.file if root else None)
        if annotations and "list" in annotations:
            path = Path(annotations["list"])
        if path is None:
            raise ManifestError(f"protocol {proto.name}: give its official list ({proto.sample_list.file}) "
                                "with --data.annotations '{list: FILE}' or put it in the data root")
        listed = proto.sample_list.read(path)
        listed.attrs["path"] = str(path)
        report._sheet("list", path)
    dropped_ids = {**proto.drop, **{s: "dropped by config (drop)" for s in (drop or [])}}
    rules = _Rules(apex_fix, onset_eq_apex, missing_frames)
    frames = []
    for part in proto.parts:
        frames.append(_build_part(proto, part, root=root, roots=roots, annotation=annotation,
                                  annotations=annotations, listed=listed, layout=layout, rules=rules,
                                  dropped_ids=dropped_ids, official_lists=official_lists, report=report))
    manifest = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MANIFEST_COLUMNS)
    duplicated = manifest[manifest["sample_id"].duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        rows = duplicated.loc[duplicated["sample_id"] == first.sample_id, "sheet_row"].tolist()
        raise ManifestError(f"{report.sheets.get(first.dataset, first.dataset + ' sheet')}: rows "
                            f"{' and '.join(map(str, rows))} are both sample {first.sample_id}; "
                            "remove the duplicate row")
    if listed is not None:
        _check_list_covered(listed, manifest, proto, report)
    unused = sorted(set(drop or []) - report.dropped_ids)
    if unused:
        report._add("notes", f"drop ids not found in the protocol (typo?): {unused}")
        log.warning("protocol %s: drop ids not found: %s", proto.name, unused)
    if report.dropped_by_rule or report.fixed:
        log.warning("protocol %s: %d fixes, %d samples dropped by rule, %d flags (the manifest report lists "
                    "each)", proto.name, len(report.fixed), len(report.dropped_by_rule), len(report.flagged))
    if not len(manifest):
        raise ManifestError(f"protocol {proto.name}: no sample in "
                            f"{', '.join(report.sheets.values()) or 'its sheets'}: "
                            "the sheet has no data rows, or every row was dropped (the manifest report says "
                            "why); check the sheet and the data root")
    empty = [c for i, c in enumerate(proto.classes) if not (manifest["label"] == i).any()]
    if empty:
        raise ManifestError(f"protocol {proto.name}: class(es) {empty} have no sample in "
                            f"{', '.join(report.sheets.values())}; the sheet lacks them (see the protocol's "
                            "description) or the frame tree is incomplete")
    return manifest.sort_values("sample_id", ignore_index=True), report


def _check_list_covered(listed: pd.DataFrame, manifest: pd.DataFrame, proto: Protocol,
                        report: ManifestReport) -> None:
    """Every official-list sample of a kept dataset must be in the manifest (or dropped visibly)."""
    found = set(manifest["sample_id"])
    keys = {f"{r.dataset}/{_key(get_dataset(r.dataset), r.subject, r.video, r.onset)}": r.sheet_row
            for r in listed.itertuples(index=False) if r.dataset in proto.datasets}
    missing = [(k, row) for k, row in keys.items() if k not in found and k not in report.dropped_ids]
    if missing:
        key, row = missing[0]
        raise ManifestError(f"{listed.attrs.get('path', proto.sample_list.file)}: row {row}: listed sample "
                            f"{key} is not in the sheets or "
                            f"on disk ({len(missing)} such); check the sheet versions and the frame tree")


@dataclass
class _Rules:
    """The content-rule options of one build (see the module docstring)."""

    apex_fix: str
    onset_eq_apex: str
    missing_frames: str


def _apex(spec: DatasetSpec, r: pd.Series, rules: _Rules,
          peak) -> tuple[float, str, list[str], str | None, str]:
    """Apply the apex rules to one row with known frames.

    Returns:
        ``(apex, apex_source, flags, drop_reason, message)``; ``drop_reason`` is set when the row
        must be dropped, ``message`` describes a fix or flag for the report (empty: none).
    """
    apex, flags = r.apex, []
    broken = ("apex_not_annotated" if spec.name == "smic" and pd.isna(apex) else
              "apex_not_numeric" if pd.isna(apex) else
              "apex_outside_clip" if not r.onset <= apex <= r.offset else None)
    if broken is None:
        if apex == r.offset and r.offset > r.onset:
            flags.append("apex_eq_offset")
        if apex == r.onset + 1:
            flags.append("apex_next_to_onset")  # one frame of rise: suspicious (SAMM 032_3_2)
        if apex != r.onset:
            return apex, "sheet", flags, None, ""
        flags.append("onset_eq_apex")
        if rules.onset_eq_apex == "drop":
            return apex, "sheet", flags, f"onset == apex ({int(apex)}) -> dropped", ""
        if rules.onset_eq_apex == "keep":
            return apex, "sheet", flags, None, f"onset == apex ({int(apex)})"
        broken = "onset_eq_apex"
    elif broken != "onset_eq_apex":
        flags.append(broken)
    if rules.apex_fix == "drop" and broken != "apex_not_annotated":
        return apex, "sheet", flags, f"{broken} -> dropped", ""
    if rules.apex_fix == "flow_peak":
        apex, source = peak(), "flow_peak"
    else:
        apex, source = (r.onset + r.offset) // 2, "midpoint"
    return apex, source, flags, None, f"{broken} (apex {r.apex}) -> apex := {source} {int(apex)}"


def _build_part(proto: Protocol, part: Part, *, root, roots, annotation, annotations, listed, layout,
                rules: _Rules, dropped_ids, official_lists, report) -> pd.DataFrame:
    spec = get_dataset(part.dataset)
    base = part_root(proto, part.dataset, root, roots)
    sheet = part_sheet(proto, part, base, annotation, annotations)
    table, source = _read_part(spec, sheet, base, proto, listed, report)
    report.rows_in_sheet[spec.name] = len(table)
    table, fixes = errata.apply_fixes(spec.name, table)
    for line in fixes:
        report._add("fixed", f"{spec.name} {source}: {line}")
    exclusions = (errata.read_exclusions(spec.name, sheet.parent) if sheet is not None and official_lists
                  else None)
    if exclusions and (exclusions.applied or exclusions.missing):
        report._add("notes", f"{spec.name}: official lists applied {exclusions.applied or 'none'}; "
                             f"not found next to the sheet: {exclusions.missing or 'none'}")
    list_label = None
    if listed is not None:
        mine = listed[listed["dataset"] == spec.name]
        list_label = {_key(spec, r.subject, r.video, r.onset): r.emotion
                      for r in mine.itertuples(index=False)}

    check = base if report.frames_checked and base is not None else None  # where files are checked
    has_frames = "flow_name" not in table.columns  # flow-image layouts have no frame numbers
    rows, dropped = [], report.dropped_by_protocol.setdefault(spec.name, {})
    fields_of = [dict(r._asdict()) for r in table.itertuples(index=False)]
    chosen = _choose_layout(spec, layout,
                            [f for f in fields_of if f["emotion"] in part.label_map] or fields_of, check)
    report.layouts[spec.name] = chosen.name
    long_clip = 2 * spec.fps  # frames in 2 s: longer is not a micro-expression by the usual definition
    for fields in fields_of:
        r = pd.Series(fields)
        dataset = fields.get("dataset", spec.name)
        key = _key(spec, r.subject, r.video, r.onset)
        sample_id = f"{dataset}/{key}"
        where = f"{source}: row {r.sheet_row} ({sample_id})"
        if list_label is not None:
            if key not in list_label:
                dropped["not in official list"] = dropped.get("not in official list", 0) + 1
                continue
            cls, mapped = list_label[key], part.label_map.get(r.emotion)
            if mapped != cls:
                report._add("flagged", f"{where}: sheet emotion {r.emotion!r} maps to {mapped!r}, the "
                                       f"official list says {cls!r} (the list wins)")
        elif r.emotion in part.label_map:
            cls = part.label_map[r.emotion]
        else:
            dropped[r.emotion] = dropped.get(r.emotion, 0) + 1
            continue
        ex_key = (r.subject, r.video.lower(), None if pd.isna(r.onset) else int(r.onset))
        reason = dropped_ids.get(sample_id) or (exclusions.drop.get(ex_key) if exclusions else None)
        if reason:
            report._add("dropped_by_rule", f"{where}: {reason}", sample_id)
            continue
        paths = _paths(chosen, fields, check)
        flags, apex, apex_source = [], r.apex, "sheet"
        frames_known = has_frames and not pd.isna(r.onset)
        if frames_known:
            if r.onset > r.offset:
                raise ManifestError(f"{where}: onset {int(r.onset)} > offset {int(r.offset)}; correct the "
                                    "frame range in the sheet")
            if exclusions:
                vid = (r.subject, r.video.lower())
                damaged = sorted(k for k in exclusions.damaged.get(vid, ()) if r.onset <= k <= r.offset)
                if damaged:
                    report._add("dropped_by_rule", f"{where}: damaged frames {damaged[:5]} (official list)",
                                sample_id)
                    continue
                if any(r.onset <= k <= r.offset for k in exclusions.bad_quality.get(vid, ())):
                    flags.append("bad_quality_frames")
            if r.offset - r.onset + 1 > long_clip > 0:
                flags.append("long_clip")
            if check is not None and rules.apex_fix == "flow_peak":
                # The peak search reads frames: a sample with missing files goes by `missing_frames` first.
                problem = _file_problem(r.onset, r.offset, paths, check)
                if problem:
                    if rules.missing_frames == "error":
                        raise ManifestError(_missing_message(where, problem))
                    report._add("dropped_by_rule", f"{where}: {problem}", sample_id)
                    continue
            apex, apex_source, apex_flags, drop_reason, message = _apex(
                spec, r, rules, lambda: _peak_apex(check, paths, int(r.onset), int(r.offset)))
            flags += apex_flags
            if drop_reason:
                report._add("dropped_by_rule", f"{where}: {drop_reason}", sample_id)
                continue
            if apex_source != "sheet":
                report._add("notes" if "apex_not_annotated" in flags else "fixed", f"{where}: {message}")
            elif flags:
                report._add("flagged", f"{where}: {message or ', '.join(flags)}")
        try:
            parsed = parse_au(r.au_raw)
        except AUParseError as exc:
            raise ManifestError(f"{where}, column {table.attrs.get('au_column', 'AU')!r}: {exc}") from None
        if parsed.notes:
            report._add("notes", f"{where}: non-AU text {list(parsed.notes)} in AU cell {parsed.raw!r} "
                                 "ignored")
        rows.append({
            "sample_id": sample_id, "dataset": dataset, "subject": f"{dataset}/{r.subject}", "video": r.video,
            "onset": r.onset, "apex": apex, "offset": r.offset,
            "apex_source": apex_source if frames_known else "",
            "emotion": r.emotion, "label": proto.classes.index(cls), "au_raw": parsed.raw,
            "au_set": format_aus(parsed.aus), "au_unknown": parsed.unknown or spec.au_coded == (),
            "au_ambiguous": parsed.ambiguous, **paths,
            "n_frames": r.offset - r.onset + 1 if frames_known else np.nan,
            "flags": ";".join(flags), "sheet_row": int(r.sheet_row),
        })
    out = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for column in FRAME_COLUMNS:
        out[column] = pd.array(out[column].astype(float), dtype="Int64")
    if check is not None and len(out):
        out = check_files(out, check, where=source, missing=rules.missing_frames, report=report)
    # Paths are relative to the data root: a composite's parts sit in <root>/<dataset>/ (or where
    # `roots` puts them, then absolute), so downstream code only ever joins data_root / path.
    prefix = (Path(roots[spec.name]).resolve().as_posix() if roots and spec.name in roots
              else spec.name if proto.composite else "")
    if prefix:
        for column in ("frame_dir", "depth_dir", "flow_image", "apex_image"):
            out[column] = [f"{prefix}/{v}" if v else v for v in out[column]]
    report.kept[spec.name] = len(out)
    return out


def _file_problem(onset, offset, paths: dict, root: Path) -> str | None:
    """What is missing on disk for one sample (None: nothing)."""
    if paths["flow_image"]:
        absent = [str(root / p) for p in (paths["flow_image"], paths["apex_image"])
                  if p and not (root / p).is_file()]
        return f"file(s) {absent} do not exist" if absent else None
    frame_dir = root / paths["frame_dir"]
    if paths["frame_pattern"].startswith("@"):  # a video file: its frame count is checked on reading
        return None if frame_dir.is_file() else f"video {frame_dir} does not exist"
    if not frame_dir.is_dir():
        return f"frame folder {frame_dir} does not exist"
    if pd.isna(onset):
        return None
    lost = sorted(set(range(int(onset), int(offset) + 1)) - frame_numbers(frame_dir, paths["frame_pattern"]))
    if not lost:
        return None
    shown = ", ".join(paths["frame_pattern"].format(k=k) for k in lost[:5])
    return f"{len(lost)} of frames {onset}..{offset} missing in {frame_dir} (e.g. {shown})"


def _missing_message(at: str, problem: str) -> str:
    return (f"{at}: {problem}; the frame tree does not match the sheet: restore the files, fix the row, "
            "or set --data.missing_frames=drop to drop such samples")


def check_files(manifest: pd.DataFrame, root: Path, *, where: str = "sheet",
                missing: Literal["error", "drop"] = "error",
                report: ManifestReport | None = None) -> pd.DataFrame:
    """Every sample's files exist under ``root``: frames ``onset..offset`` (frame layouts) or the
    flow image and apex crop (flow-image layouts). Returns the rows kept.

    Raises:
        ManifestError: with ``missing="error"``, naming the sheet row, the folder and example files.
    """
    keep = []
    for r in manifest.itertuples(index=False):
        problem = _file_problem(r.onset, r.offset, r._asdict(), root)
        keep.append(problem is None)
        if problem is None:
            continue
        at = f"{where}: row {r.sheet_row} ({r.sample_id})"
        if missing == "error":
            raise ManifestError(_missing_message(at, problem))
        if report is not None:
            report._add("dropped_by_rule", f"{at}: {problem}", r.sample_id)
    return manifest[np.array(keep, dtype=bool)].reset_index(drop=True)
