"""Dataset layouts and class protocols, by name: the one place these facts live.

* :data:`DATASETS` says how a dataset is stored: which sheet reader, which on-disk layouts (where a
  sample's frame folder is, how frame ``k`` is named), its emotion vocabulary, frame rate and the AU
  vocabulary it is scored on.
* :data:`PROTOCOLS` says which samples and classes an experiment uses. A protocol has one *part*
  per dataset; each part maps that dataset's emotion words to class names (emotions outside the map
  are dropped, and counted) and pins the sheet version. Composites (MEGC2019, FAMNet's
  SAMM + CASME II + MMEW) have several parts; an official sample list, where one exists, fixes
  the samples and labels exactly.

Every dataset also has an "all samples" protocol of the same name (``famnet-pl manifest samm``).
Configs name the protocol by string (``--data.protocol samm_5cls``). Facts and counts:
../shared/notes/datasets.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from famnet_pl.data import annotations as sheets
from famnet_pl.data import synthetic
from famnet_pl.data.au import AU_VOCABULARIES, parse_au


class ProtocolError(ValueError):
    """An unknown dataset, protocol or layout name, or an impossible protocol override."""


@dataclass(frozen=True)
class Layout:
    """Where one dataset release keeps a sample's frames, relative to the dataset root.

    Templates are filled from the sample's sheet row (``subject``, ``video``, ``emotion`` and any
    extra column its reader adds, e.g. SMIC's ``disk_subject``); ``frame_pattern`` also takes the
    frame number ``k``. The manifest stores the filled-in strings, so later stages never need the
    layout again.

    Attributes:
        name: ``raw``, ``cropped``...
        frame_dir: template of a sample's frame folder (``CASME2_RAW_selected/{subject}/{video}``).
        frame_pattern: template of frame ``k``'s file name (``img{k}.jpg``, ``{subject}_{k:05d}.jpg``).
        depth_dir: template of the depth frames' folder (CAS(ME)^3), recorded for later use.
        flow_image: template of a precomputed flow image (``flow_images`` datasets).
        apex_image: template of a precomputed apex crop (``flow_images`` datasets).
        face_crops: its frames are face crops already (CASME II ``Cropped``): ``face_detector=auto``
            crops nothing there, and detects the face everywhere else.
    """

    name: str
    frame_dir: str = ""
    frame_pattern: str = ""
    depth_dir: str = ""
    flow_image: str = ""
    apex_image: str = ""
    face_crops: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is stored and annotated.

    Attributes:
        name: namespace of subject ids (``casme2/sub01``) and sample ids.
        read_sheet: annotation reader returning the normalised table (annotations.py).
        layouts: on-disk layouts, the default first; ``layout="auto"`` picks the one found on disk.
        emotions: every emotion word the sheet may hold (lower case); any other is a sheet error.
        fps: capture frame rate.
        au_vocab: AUs the dataset is scored on (MEB benchmark vocabularies).
        au_coded: AUs the dataset's sheets code at all (``None``: every AU, full FACS coding). In a
            composite, an AU a sample's dataset never codes is masked in its AU loss instead of read
            as "absent" (SMIC codes none).
        sample_key: template of the sample id under the namespace (CAS(ME)^3 has many MEs per
            video, so its key includes the onset).
        kind: ``frames`` (frame folders: both views) or ``flow_images`` (precomputed flow images
            and apex crops: 2D view only).
    """

    name: str
    read_sheet: Callable[[Path], pd.DataFrame]
    layouts: tuple[Layout, ...]
    emotions: tuple[str, ...]
    fps: int
    au_vocab: tuple[int, ...]
    au_coded: tuple[int, ...] | None = None
    sample_key: str = "{subject}/{video}"
    kind: str = "frames"

    @property
    def has_clips(self) -> bool:
        """Whether the dataset has frame sequences (the 3D view)."""
        return self.kind == "frames"

    def layout(self, name: str) -> Layout:
        """The layout called ``name`` (ValueError lists the known ones)."""
        for layout in self.layouts:
            if layout.name == name:
                return layout
        raise ProtocolError(f"dataset {self.name}: unknown layout {name!r}; known: "
                         f"{[lay.name for lay in self.layouts]} (or 'auto')")


@dataclass(frozen=True)
class Part:
    """One dataset's share of a protocol.

    Attributes:
        dataset: key into :data:`DATASETS`.
        label_map: sheet emotion (lower case) -> class name; other emotions are dropped.
        sheet: file name of the pinned sheet version, looked up in the dataset root when the config
            gives no annotation path (``None``: the dataset has no sheet of its own, SMIC).
    """

    dataset: str
    label_map: Mapping[str, str]
    sheet: str | None


@dataclass(frozen=True)
class SampleList:
    """An official list that fixes a protocol's samples and labels exactly.

    Attributes:
        file: file name, looked up in the data root unless the config gives a path.
        read: reader -> DataFrame with ``dataset, subject, video, onset`` (onset may be NA when
            the key does not need it) and ``emotion`` (a class name of the protocol).
    """

    file: str
    read: Callable[[Path], pd.DataFrame]


@dataclass(frozen=True)
class Protocol:
    """A class protocol: which samples, which classes, which sheet versions.

    Attributes:
        name: ``<dataset>_<n>cls`` (or the dataset's name for "all samples").
        classes: class names in label order.
        parts: one :class:`Part` per dataset.
        sample_list: official list fixing samples and labels (MEGC2019), or ``None``.
        drop: sample ids dropped by the protocol definition, with the reason logged.
        au_vocab: AU vocabulary of the AU head; default: the single dataset's.
        description: one line for the README table and the report.
        composite: several datasets, each in its own folder ``<data_root>/<dataset>/`` (stays true
            when ``datasets`` narrows a composite to one of them).
    """

    name: str
    classes: tuple[str, ...]
    parts: tuple[Part, ...]
    sample_list: SampleList | None = None
    drop: Mapping[str, str] = field(default_factory=dict)
    au_vocab: tuple[int, ...] | None = None
    description: str = ""
    composite: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(p.dataset for p in self.parts)

    @property
    def dataset(self) -> str:
        """The dataset of a single-dataset protocol (``composite`` otherwise)."""
        return "composite" if self.composite else self.parts[0].dataset

    @property
    def vocab(self) -> tuple[int, ...]:
        """AU vocabulary of the AU head."""
        if self.au_vocab is not None:
            return self.au_vocab
        return DATASETS[self.parts[0].dataset].au_vocab

    @property
    def has_clips(self) -> bool:
        """Every part has frame sequences (the 3D view)."""
        return all(DATASETS[d].has_clips for d in self.datasets)


# --- datasets ----------------------------------------------------------------------------------

# The synthetic set is scored on every AU its emotion table renders (derived, not restated).
SYNTH_AU_VOCAB = tuple(sorted({au for variants in synthetic.EMOTION_AUS.values()
                               for v in variants for au in parse_au(v).aus}))

CASME2_EMOTIONS, SAMM_EMOTIONS, MMEW_EMOTIONS, CASME3_EMOTIONS, SMIC_EMOTIONS = (
    sheets.EMOTIONS[d] for d in ("casme2", "samm", "mmew", "casme3", "smic"))
MEGC_CLASSES = sheets.MEGC_LABELS

DATASETS: dict[str, DatasetSpec] = {
    "casme2": DatasetSpec(
        name="casme2", read_sheet=sheets.read_casme2_sheet, emotions=CASME2_EMOTIONS, fps=200,
        au_vocab=AU_VOCABULARIES["casme2"],
        layouts=(Layout("raw", "CASME2_RAW_selected/{subject}/{video}", "img{k}.jpg"),
                 Layout("cropped", "Cropped/{subject}/{video}", "reg_img{k}.jpg", face_crops=True)),
    ),
    "samm": DatasetSpec(
        name="samm", read_sheet=sheets.read_samm_sheet, emotions=SAMM_EMOTIONS, fps=200,
        au_vocab=AU_VOCABULARIES["samm"],
        # Greyscale frames, 5-digit numbers prefixed by the subject: 006/006_1_2/006_05562.jpg.
        layouts=(Layout("raw", "{subject}/{video}", "{subject}_{k:05d}.jpg"),),
    ),
    "mmew": DatasetSpec(
        name="mmew", read_sheet=sheets.read_mmew_sheet, emotions=MMEW_EMOTIONS, fps=90,
        au_vocab=AU_VOCABULARIES["mmew"],
        layouts=(Layout("raw", "Micro_Expression/{emotion}/{video}", "{k}.jpg"),),
    ),
    "casme3": DatasetSpec(
        name="casme3", read_sheet=sheets.read_casme3_sheet, emotions=CASME3_EMOTIONS, fps=30,
        au_vocab=AU_VOCABULARIES["cross12"], sample_key="{subject}/{video}/{onset}",
        layouts=(Layout("raw", "{subject}/{video}/color", "{k}.jpg", depth_dir="{subject}/{video}/depth"),),
    ),
    "smic": DatasetSpec(
        name="smic", read_sheet=sheets.scan_smic, emotions=SMIC_EMOTIONS, fps=100, au_vocab=(), au_coded=(),
        # No sheet: the frame tree is the annotation (HS/s1/micro/negative/s1_ne_01/image106550.bmp).
        layouts=(Layout("raw", "HS/{disk_subject}/micro/{emotion}/{video}", "image{k:06d}.bmp"),),
    ),
    "megc2019_flow": DatasetSpec(
        name="megc2019_flow", read_sheet=sheets.read_megc_flow_csv, emotions=MEGC_CLASSES, fps=0,
        au_vocab=(), au_coded=(), kind="flow_images",
        # {flow_name} is "<sub>_<filename_o> .png" (with the space), {imagename} the apex crop.
        # "published": the release as distributed, the CSV at the root and both image folders under datasets/.
        layouts=(Layout("raw", flow_image="STSNet_whole_norm_u_v_os/{flow_name}",
                        apex_image="combined_datasets_whole/{imagename}", face_crops=True),
                 Layout("published", flow_image="datasets/STSNet_whole_norm_u_v_os/{flow_name}",
                        apex_image="datasets/combined_datasets_whole/{imagename}", face_crops=True)),
    ),
    # The built-in synthetic set is written in CASME II's format and read by CASME II's reader.
    "synth": DatasetSpec(
        name="synth", read_sheet=sheets.read_casme2_sheet, emotions=synthetic.SYNTH_CLASSES, fps=200,
        au_vocab=SYNTH_AU_VOCAB,
        layouts=(Layout("raw", synthetic.FRAMES_DIRNAME + "/{subject}/{video}", "img{k}.jpg",
                        face_crops=True),),
    ),
}

# --- protocols ---------------------------------------------------------------------------------


def _identity(classes: tuple[str, ...]) -> dict[str, str]:
    return {c: c for c in classes}


def _merge(groups: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """{class: emotions} -> {emotion: class}."""
    return {emotion: cls for cls, emotions in groups.items() for emotion in emotions}


CASME2_2014, CASME2_2019 = "CASME2-coding-20140508.xlsx", "CASME2-coding-20190701.xlsx"
SAMM_SHEET = "SAMM_Micro_FACS_Codes_v2.xlsx"
MMEW_SHEET = "MMEW_Micro_Exp_delete_others.csv"
MMEW_FULL_SHEET = "MMEW_Micro_Exp.xlsx"
CASME3_SHEET = "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx"

_CASME2_5 = ("happiness", "surprise", "disgust", "repression", "others")
_SAMM_5 = ("anger", "contempt", "happiness", "surprise", "other")
# MEGC2019 grouping of each dataset's emotions into negative / positive / surprise.
CASME2_3CLS = _merge({"negative": ("disgust", "repression"), "positive": ("happiness",),
                      "surprise": ("surprise",)})
SAMM_3CLS = _merge({"negative": ("anger", "contempt", "disgust", "fear", "sadness"),
                    "positive": ("happiness",), "surprise": ("surprise",)})
MMEW_3CLS = _merge({"negative": ("disgust", "fear", "sadness", "anger"), "positive": ("happiness",),
                    "surprise": ("surprise",)})
CASME3_4CLS = _merge({"negative": ("disgust", "fear", "anger", "sad"), "positive": ("happy",),
                      "surprise": ("surprise",), "others": ("others",)})
CASME3_3CLS = {e: c for e, c in CASME3_4CLS.items() if c != "others"}

# MEGC2019 dropped these two CASME II samples from its list (broken apex); FAMNet's composite follows.
_MEGC_CASME2_DROPS = {"casme2/sub04/EP12_01f": "apex '/' (MEGC2019 list drops it)",
                      "casme2/sub05/EP09_05f": "onset == apex (MEGC2019 list drops it)"}

_P = Protocol
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    _P("casme2_5cls", _CASME2_5, (Part("casme2", _identity(_CASME2_5), CASME2_2014),),
       description="CASME II 5-class, 2014 sheet (drops fear, sadness): 246 samples, 26 subjects"),
    _P("casme2_5cls_2019", _CASME2_5, (Part("casme2", _identity(_CASME2_5), CASME2_2019),),
       description="CASME II 5-class, 2019 sheet (3 sadness -> surprise): 249 samples"),
    _P("casme2_3cls", MEGC_CLASSES, (Part("casme2", CASME2_3CLS, CASME2_2014),),
       description="CASME II negative/positive/surprise (MEGC grouping, all rows): 147 samples"),
    _P("samm_5cls", _SAMM_5, (Part("samm", _identity(_SAMM_5), SAMM_SHEET),),
       description="SAMM 5-class (drops disgust, fear, sadness): 136 samples, 27 subjects"),
    _P("samm_3cls", MEGC_CLASSES, (Part("samm", SAMM_3CLS, SAMM_SHEET),),
       description="SAMM negative/positive/surprise (MEGC grouping): 133 samples, 28 subjects"),
    _P("mmew_6cls", MMEW_EMOTIONS[:6], (Part("mmew", _identity(MMEW_EMOTIONS[:6]), MMEW_SHEET),),
       description="MMEW 6 emotions (no others): 234 samples, 30 subjects"),
    _P("mmew_5cls", MMEW_EMOTIONS[:5], (Part("mmew", _identity(MMEW_EMOTIONS[:5]), MMEW_SHEET),),
       description="MMEW 5-class (no others, no anger): 226 samples"),
    _P("mmew_4cls", ("happiness", "surprise", "disgust", "others"),
       (Part("mmew", _identity(("happiness", "surprise", "disgust", "others")), MMEW_FULL_SHEET),),
       description="MMEW happiness/surprise/disgust/others: needs the original 300-row MMEW_Micro_Exp.xlsx"),
    _P("mmew_3cls", MEGC_CLASSES, (Part("mmew", MMEW_3CLS, MMEW_SHEET),),
       description="MMEW negative/positive/surprise: 234 samples"),
    _P("casme3_7cls", CASME3_EMOTIONS, (Part("casme3", _identity(CASME3_EMOTIONS), CASME3_SHEET),),
       description="CAS(ME)^3 Part A, 7 classes incl. others: 860 MEs (845 after the official "
                   "occluded-apex list)"),
    _P("casme3_4cls", ("negative", "positive", "surprise", "others"),
       (Part("casme3", CASME3_4CLS, CASME3_SHEET),),
       description="CAS(ME)^3 Part A negative/positive/surprise/others: 860 MEs (845 after the "
                   "occluded-apex list)"),
    _P("casme3_3cls", MEGC_CLASSES, (Part("casme3", CASME3_3CLS, CASME3_SHEET),),
       description="CAS(ME)^3 Part A negative/positive/surprise: 699 MEs (690 after the occluded-apex list)"),
    _P("casme3_3cls_687", MEGC_CLASSES, (Part("casme3", CASME3_3CLS, CASME3_SHEET),),
       sample_list=SampleList("cas(me)3_part_A_edited.csv", sheets.read_casme3_edited_list),
       description="CAS(ME)^3 3-class, the published 687-ME list (HTNet; 678 after the occluded-apex list)"),
    _P("smic_3cls", SMIC_EMOTIONS, (Part("smic", _identity(SMIC_EMOTIONS), None),),
       description="SMIC-HS negative/positive/surprise from the frame tree (no apex: midpoint, flagged)"),
    _P("megc2019_3cls", MEGC_CLASSES,
       (Part("casme2", CASME2_3CLS, CASME2_2014), Part("samm", SAMM_3CLS, SAMM_SHEET),
        Part("smic", _identity(SMIC_EMOTIONS), None)),
       sample_list=SampleList("combined_3class_gt.csv", sheets.read_megc_list),
       au_vocab=AU_VOCABULARIES["cross12"],
       description="MEGC2019 composite, the official 442-sample list: 68 subjects"),
    _P("megc2019_flow_3cls", MEGC_CLASSES, (Part("megc2019_flow", _identity(MEGC_CLASSES),
                                                 "combined_3_class2_for_optical_flow.csv"),),
       description="MEGC2019 composite as precomputed flow images + apex crops (2D view only): 442"),
    _P("famnet_3cls", MEGC_CLASSES,
       (Part("casme2", CASME2_3CLS, CASME2_2014), Part("samm", SAMM_3CLS, SAMM_SHEET),
        Part("mmew", MMEW_3CLS, MMEW_SHEET)),
       drop=_MEGC_CASME2_DROPS, au_vocab=AU_VOCABULARIES["cross12"],
       description="FAMNet composite SAMM + CASME II + MMEW, 3-class (our default; the paper gives "
                   "none): 512 samples, 82 subjects"),
    _P("synth_4cls", synthetic.SYNTH_CLASSES,
       (Part("synth", _identity(synthetic.SYNTH_CLASSES), synthetic.SHEET_NAME),),
       description="built-in synthetic set (CASME II format), generated on first use"),
)}

# Composites keep each dataset in its own folder (and stay composites when narrowed).
PROTOCOLS = {name: replace(p, composite=len(p.parts) > 1) for name, p in PROTOCOLS.items()}

# "All samples" protocols for CASME II and SAMM (their 5-class protocols drop emotions). For the
# other datasets the dataset name is an alias of the protocol that already keeps every sample
# (MMEW's pinned derived sheet has no "others").
for _name, _sheet in {"casme2": CASME2_2014, "samm": SAMM_SHEET}.items():
    _emotions = DATASETS[_name].emotions
    PROTOCOLS[_name] = Protocol(_name, _emotions, (Part(_name, _identity(_emotions), _sheet),),
                                description=f"{_name}: every sample of the pinned sheet, "
                                            "native emotion words")
ALIASES = {"mmew": "mmew_6cls", "casme3": "casme3_7cls", "smic": "smic_3cls"}


def dataset_protocols(dataset: str) -> tuple[str, ...]:
    """The protocols over ``dataset`` alone, then their aliases (``mmew`` for ``mmew_6cls``), in
    :data:`PROTOCOLS` order: what a per-dataset DataModule accepts."""
    names = [name for name, proto in PROTOCOLS.items() if proto.datasets == (dataset,)]
    return (*names, *[alias for alias, name in ALIASES.items() if name in names])


def get_dataset(name: str) -> DatasetSpec:
    """Look up a dataset layout by name (KeyError lists the known ones)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ProtocolError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


def get_protocol(name: str, *, datasets: list[str] | None = None,
                 label_maps: Mapping[str, Mapping[str, str]] | None = None,
                 classes: list[str] | None = None) -> Protocol:
    """Look up a protocol by name, optionally narrowed or re-mapped (composites are configurable).

    Args:
        name: protocol name, or a dataset name for all its samples (ProtocolError lists the known ones).
        datasets: keep only these parts (e.g. two datasets of a composite).
        label_maps: per dataset, a replacement emotion -> class map.
        classes: replacement class list (label order), for use with ``label_maps``.
    """
    try:
        proto = PROTOCOLS[ALIASES.get(name, name)]
    except KeyError:
        raise ProtocolError(f"unknown protocol {name!r}; known: {sorted([*PROTOCOLS, *ALIASES])}") from None
    if datasets:
        unknown = sorted(set(datasets) - set(proto.datasets))
        if unknown:
            raise ProtocolError(f"protocol {name}: datasets {unknown} are not among its parts "
                                f"{list(proto.datasets)}")
        proto = replace(proto, parts=tuple(p for p in proto.parts if p.dataset in datasets))
    if label_maps:
        proto = replace(proto, parts=tuple(replace(p, label_map=dict(label_maps.get(p.dataset, p.label_map)))
                                           for p in proto.parts))
    if classes:
        proto = replace(proto, classes=tuple(classes))
    for part in proto.parts:
        stray = sorted(set(part.label_map.values()) - set(proto.classes))
        if stray:
            raise ProtocolError(f"protocol {name}: label map of {part.dataset} names classes {stray} "
                             f"that are not in {list(proto.classes)}")
    return proto
