"""Dataset layouts and class protocols, by name: the one place these facts live.

* :data:`DATASETS` says how a dataset is stored: which sheet reader, where the frames are, how a
  frame file is named, its frame rate and the AU vocabulary it is scored on.
* :data:`PROTOCOLS` says which samples and classes an experiment uses: a map from the sheet's
  emotion words to class names (emotions not in the map are dropped) and the pinned sheet version.

Configs name the protocol by string (``--data.protocol synth_4cls``); it names its dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from famnet_pl.data import synthetic
from famnet_pl.data.annotations import read_casme2_sheet
from famnet_pl.data.au import AU_VOCABULARIES, parse_au


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is laid out on disk.

    Attributes:
        name: namespace of subject ids (``casme2/sub01``) and sample ids.
        read_sheet: annotation reader returning the normalised table (annotations.py).
        frames_subdir: folder under the dataset root holding ``<subject>/<video>/`` frame folders.
        frame_pattern: file name of frame ``k`` (``img{k}.jpg``).
        fps: capture frame rate.
        au_vocab: AU numbers the dataset is scored on.
    """

    name: str
    read_sheet: Callable[[Path], pd.DataFrame]
    frames_subdir: str
    frame_pattern: str
    fps: int
    au_vocab: tuple[int, ...]


@dataclass(frozen=True)
class Protocol:
    """A class protocol: which samples, which classes, which sheet version.

    Attributes:
        name: ``<dataset>_<n>cls``.
        dataset: key into :data:`DATASETS`.
        classes: class names in label order.
        label_map: sheet emotion (lower case) -> class name; other emotions are dropped.
        sheet: file name of the pinned sheet version, looked up in the dataset root when the
            config gives no ``annotation`` path.
    """

    name: str
    dataset: str
    classes: tuple[str, ...]
    label_map: Mapping[str, str]
    sheet: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# The synthetic set is scored on every AU its emotion table renders (derived, not restated).
SYNTH_AU_VOCAB = tuple(sorted({au for variants in synthetic.EMOTION_AUS.values()
                               for v in variants for au in parse_au(v).aus}))

DATASETS: dict[str, DatasetSpec] = {
    "casme2": DatasetSpec(
        name="casme2", read_sheet=read_casme2_sheet, frames_subdir="CASME2_RAW_selected",
        frame_pattern="img{k}.jpg", fps=200, au_vocab=AU_VOCABULARIES["casme2"],
    ),
    # The built-in synthetic set is written in CASME II's format and read by CASME II's reader.
    "synth": DatasetSpec(
        name="synth", read_sheet=read_casme2_sheet, frames_subdir=synthetic.FRAMES_DIRNAME,
        frame_pattern="img{k}.jpg", fps=200, au_vocab=SYNTH_AU_VOCAB,
    ),
}

_CASME2_5 = ("happiness", "surprise", "disgust", "repression", "others")

PROTOCOLS: dict[str, Protocol] = {
    # CASME II 5-class (drops fear and sadness): 246 samples on the 2014 sheet.
    "casme2_5cls": Protocol("casme2_5cls", "casme2", _CASME2_5, {c: c for c in _CASME2_5},
                            sheet="CASME2-coding-20140508.xlsx"),
    "synth_4cls": Protocol("synth_4cls", "synth", synthetic.SYNTH_CLASSES,
                           {c: c for c in synthetic.SYNTH_CLASSES}, sheet=synthetic.SHEET_NAME),
}


def get_dataset(name: str) -> DatasetSpec:
    """Look up a dataset layout by name (KeyError lists the known ones)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


def get_protocol(name: str) -> Protocol:
    """Look up a protocol by name (KeyError lists the known ones)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}") from None
