"""A model directory: a trained network and everything needed to build its inputs from raw frames.

Layout (written by ``famnet-pl train-final``, and by ``famnet-pl loso --keep-models`` in every fold
folder)::

    MODEL_DIR/
      model.ckpt        MERLitModule weights and hyperparameters (no optimiser state)
      preprocess.json   how the inputs were made: views and sizes, flow algorithm, registration,
                        face detector and margin, clip length and sampling, the training samples'
                        normalisation statistics, classes and AU vocabulary, test-time augmentation
      model_card.md/.json  (train-final) what was trained on what, with which result and limits

Data flow of a model directory's use (predict.py, export.py)::

    preprocess.json -> ViewConfig + stats ---------------------------\\
    frames / video --preprocess_sample (the training code path)--> arrays -> MERDataset -> batch
    model.ckpt -> MERLitModule.predict_step(batch) -> class and AU probabilities

Both files are written under temporary names and renamed into place; ``preprocess.json`` last, so a
directory that has it is complete.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from famnet_pl.data.preprocess import ViewConfig
from famnet_pl.models.module import MERLitModule
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_bytes, atomic_write_json

MODEL_CKPT = "model.ckpt"
PREPROCESS_JSON = "preprocess.json"
MODEL_CARD_MD = "model_card.md"
MODEL_CARD_JSON = "model_card.json"
FORMAT = 1  # preprocess.json's layout version

#: Frames a clip needs: an onset and a later frame (flow, and a clip that moves).
MIN_FRAMES = 2


@dataclass(frozen=True)
class Preprocessing:
    """The contents of ``preprocess.json``: what a network's inputs are and how they were made.

    Attributes:
        model: registry name of the network (``famnet_r18``...), checked against the checkpoint.
        protocol: the protocol trained on; ``dataset``: its dataset (the fps behind ``clip_fps``).
        classes: class names in label order; ``au_vocab``: AU numbers of the AU head (may be unused).
        trains_au: whether an AU head was trained (only then are AU probabilities reported).
        input_2d, clip_mode, tta: the DataModule's view options.
        views: every :class:`ViewConfig` field (sizes, flow, registration, face crop, clip sampling).
        stats: per-channel ``mean_2d``, ``std_2d`` (and ``mean_3d``, ``std_3d``) of the training samples.
        min_frames: frames onset..offset a clip needs.
        flow_images: trained on precomputed flow images (MEGC2019's STSTNet images), whose
            preprocessing (the authors' own flow, min-max scaled per image) cannot be redone from frames.
    """

    model: str
    protocol: str
    dataset: str
    classes: tuple[str, ...]
    au_vocab: tuple[int, ...]
    trains_au: bool
    input_2d: str
    clip_mode: str
    tta: str
    views: dict[str, Any]
    stats: dict[str, list[float]]
    min_frames: int = MIN_FRAMES
    flow_images: bool = False
    format: int = FORMAT

    @property
    def view_config(self) -> ViewConfig:
        return ViewConfig(**self.views)

    def stats_arrays(self) -> dict[str, np.ndarray]:
        """The statistics as float32 arrays, as the DataModule computed them."""
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.stats.items()}

    @classmethod
    def of(cls, module: MERLitModule, dm) -> Preprocessing:
        """From a trained module and the DataModule it was trained with (after setup)."""
        hp = dm.hparams
        stats = {k: np.asarray(v, dtype=np.float32).tolist() for k, v in dm.train_set.stats.items()}
        dataset = dm.protocol.dataset or sorted({d for d in dm.manifest["dataset"]})[0]
        return cls(model=module.hparams.model, protocol=dm.protocol.name, dataset=dataset,
                   classes=tuple(dm.class_names), au_vocab=tuple(int(a) for a in dm.au_vocab),
                   trains_au=bool(module.trains_au), input_2d=hp.input_2d, clip_mode=hp.clip_mode,
                   tta=hp.tta, views=asdict(dm.views), stats=stats,
                   flow_images=not dm.protocol.has_clips)

    @classmethod
    def read(cls, model_dir: str | Path) -> Preprocessing:
        path = Path(model_dir) / PREPROCESS_JSON
        if not Path(model_dir).is_dir():
            raise BadInput(f"{model_dir}: no such model directory (famnet-pl train-final writes one: "
                           "runs/<exp>/<dataset>/final)")
        if not path.is_file():
            raise BadInput(f"{model_dir}: no {PREPROCESS_JSON}, so it is not a model directory (or one "
                           "whose writing was interrupted); use the folder famnet-pl train-final wrote "
                           "(runs/<exp>/<dataset>/final) or a fold folder of famnet-pl loso --keep-models")
        try:
            record = json.loads(path.read_text())
            known = {f.name for f in fields(cls)}
            pre = cls(**{k: tuple(v) if k in ("classes", "au_vocab") else v
                         for k, v in record.items() if k in known})
            pre.view_config  # noqa: B018 -- the views must make a ViewConfig
            return pre
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadInput(f"{path}: not a preprocess.json this version reads ({exc}); write it again "
                           "with famnet-pl train-final") from None


def write_bundle(model_dir: str | Path, module: MERLitModule, dm) -> Preprocessing:
    """Write ``model.ckpt`` (weights and hyperparameters, as Lightning lays out a weights-only
    checkpoint: ``MERLitModule.load_from_checkpoint`` reads it) and then ``preprocess.json``. Called on
    one process (no collective: safe on rank 0 alone under DDP)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save({"pytorch-lightning_version": L.__version__, "state_dict": state, "hparams_name": "kwargs",
                "hyper_parameters": dict(module.hparams)}, buffer)
    atomic_write_bytes(model_dir / MODEL_CKPT, buffer.getvalue())
    preprocessing = Preprocessing.of(module, dm)
    atomic_write_json(model_dir / PREPROCESS_JSON, asdict(preprocessing))
    return preprocessing


def load_bundle(model_dir: str | Path) -> tuple[MERLitModule, Preprocessing]:
    """The trained module (eval mode, CPU) and its preprocessing; BadInput (one line) for a folder
    that is not a model directory or a checkpoint that does not belong to it."""
    preprocessing = Preprocessing.read(model_dir)
    path = Path(model_dir) / MODEL_CKPT
    if not path.is_file():
        raise BadInput(f"{model_dir}: {PREPROCESS_JSON} but no {MODEL_CKPT}; copy the checkpoint back or "
                       "train the model again (famnet-pl train-final)")
    not_ours = (f"{path}: not a famnet_pl model checkpoint", f"use the {MODEL_CKPT} famnet-pl "
                f"train-final wrote with this {PREPROCESS_JSON}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        name = hparams["model"]
    except Exception as exc:  # pickle, zip or key errors: not one of our checkpoints
        raise BadInput(f"{not_ours[0]} ({type(exc).__name__}); {not_ours[1]}") from None
    if name != preprocessing.model or hparams.get("num_classes") != len(preprocessing.classes):
        raise BadInput(f"{path}: a checkpoint of {name} with {hparams.get('num_classes')} classes, and "
                       f"{PREPROCESS_JSON} describes {preprocessing.model} with {len(preprocessing.classes)} "
                       "(a checkpoint from another model); keep each model.ckpt with its own preprocess.json")
    # The trained weights replace any initial ones: pretrained-weight options (a file, a download)
    # of the training machine are not needed where the model is used; nor is compiling it (tens of
    # seconds for a few clips, and export traces the plain network).
    net = {k: v for k, v in (hparams.get("net") or {}).items() if not k.startswith("pretrained_")}
    try:
        # Lightning's loader: it also re-instantiates LightningCLI-saved hyperparameters (dataclasses).
        module = MERLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=False, net=net,
                                                  compile=False)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise BadInput(f"{not_ours[0]} this version can build ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]}); {not_ours[1]}") from None
    return module.eval(), preprocessing
