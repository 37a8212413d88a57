"""MERDataModule: one LOSO fold of one protocol (one dataset or a composite), serving the views the
model reads.

Data flow::

    use_inputs:   the views the model reads (MERLitModule.inputs, told by the CLI): only these are
                  preprocessed, cached, gathered and moved (no clip for a 2D-only model such as
                  STSTNet, no 2D view for AMNet3D alone)
    prepare_data: synthetic set generated if the protocol needs it and it is missing
    setup:        manifest (validated, every dataset of the protocol) -> cached arrays (decoded once,
                  mmap) -> fold split (test = one subject, or one dataset with ``split="dataset"``;
                  optional inner validation = held-out *training* groups)
                  -> per-channel standardisation from training samples only
    loaders:      the cache's arrays as stored (uint8 frames, float32 flow) + drawn augmentation
                  parameters -> transfer -> on_after_batch_transfer (data/views.py, on the device):
    batches:      {"x2d": (B, C2d, S, S), "x3d": (B, 3, T, s, s), "label": (B,),
                   "au": (B, A), "au_mask": (B, A), "index": (B,)
                   [, "landmarks": (B, 5, 2) with a face detector: xy in [0, 1], NaN if none]}

2D view (``input_2d``): ``apex`` (RGB apex frame, 3 channels), ``flow`` (onset->apex u, v and
optical strain, 3 channels), ``both`` (6 channels), ``pair`` (onset and apex RGB, 6 channels) or
``pair_flow`` (onset, apex, flow: 9 channels). 3D view: ``clip_len`` frames sampled
uniformly from onset to offset; ``clip_mode="diff"`` subtracts the first (onset) frame from every
frame, which removes identity and keeps motion; ``clip_mode="flow"`` is the optical flow and strain
from the onset to each of those frames (T x (u, v, strain)), computed at ``flow_size`` so that motion
that is sub-pixel at the clip side survives. Precomputed-flow datasets (``megc2019_flow``) have
no frames: their batches carry no ``x3d`` and models run their 2D branch alone.

One DataModule per dataset (``CASME2DataModule``, ``SAMMDataModule``, ``MMEWDataModule``,
``CASME3DataModule``, ``SMICDataModule``, ``MEGC2019DataModule``, ``SynthDataModule``) fixes the
dataset: it takes that dataset's protocols only (default: the one of experiments/data/<name>.yaml)
and every other option of MERDataModule unchanged. MERDataModule itself takes any protocol
(composites such as ``famnet_3cls``).

Folds are the groups (namespaced subjects such as ``samm/006``, or datasets) in sorted order;
``fold`` indexes them. The test group never contributes to normalisation statistics, augmentation,
or validation. In a composite, AUs a sample's dataset does not code are masked in its AU loss.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import ClassVar, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate, get_worker_info

from famnet_pl.data import synthetic
from famnet_pl.data.au import au_targets, parse_au_set
from famnet_pl.data.frames import FlowAlgorithm
from famnet_pl.data.manifest import ApexFix, ManifestError, build_manifest, part_root, part_sheet
from famnet_pl.data.preprocess import Prepared, ViewConfig, preprocess
from famnet_pl.data.protocols import PROTOCOLS, ProtocolError, dataset_protocols, get_dataset, get_protocol
from famnet_pl.data.transforms import ClipAugment, hflip_points, move_points, params_tensor
from famnet_pl.data.views import INPUT_2D_CHANNELS, VIEWS_2D, BatchViews, raw_2d, raw_3d, rgb_channels

log = logging.getLogger(__name__)

class MERDataset(Dataset):
    """Indexable view over cached arrays for a subset of manifest rows (see module docstring).

    An item holds the cache's arrays as they are stored (uint8 frames, float32 flow), this sample's
    drawn augmentation parameters and its targets; :attr:`views` (data/views.py) turns a batch of
    them into model inputs on the batch's device. :meth:`tensors` does both for a few samples.
    """

    #: Set in a MERLoader's workers (:func:`init_worker`): batches leave the cached arrays to the
    #: main process.
    arrays_in_main: bool = False

    def __init__(self, arrays: dict[str, np.ndarray], indices: np.ndarray, labels: np.ndarray,
                 au: np.ndarray, au_mask: np.ndarray, *, input_2d: str, clip_mode: str,
                 stats: dict[str, np.ndarray], augment: ClipAugment | None, tta: str = "none") -> None:
        self.arrays, self.indices = arrays, indices
        self.labels, self.au, self.au_mask = labels, au, au_mask
        self.input_2d, self.clip_mode, self.stats, self.augment = input_2d, clip_mode, stats, augment
        self.tta = tta
        self.views = BatchViews(input_2d, clip_mode, stats) if stats else None
        self._rgb = rgb_channels(input_2d, clip_mode)  # once, not per sample
        # The parts of the 2D view, and whether there is a clip: only the views the model reads were
        # built (MERDataModule.use_inputs), so an absent one is not read.
        self._parts_2d = VIEWS_2D[input_2d] if all(name in arrays for name in VIEWS_2D[input_2d]) else ()
        self.has_2d = bool(self._parts_2d)
        self._cached = [*self._parts_2d, *(["clip"] if "clip" in arrays else [])]  # raw views

    def __len__(self) -> int:
        return len(self.indices)

    def view_2d(self, i: int) -> np.ndarray | None:
        """Un-normalised 2D input ``(S, S, C)`` float32 of manifest row ``i`` (None: the model reads no
        2D view)."""
        if not self.has_2d:
            return None
        return raw_2d(self.arrays, self.input_2d, i).numpy()

    def view_3d(self, i: int) -> np.ndarray | None:
        """Un-normalised clip ``(T, s, s, 3)`` float32 of manifest row ``i`` (None: no clips): RGB frames
        in [0, 1], or the flow sequence (``clip_mode="flow"``) in pixels."""
        if "clip" not in self.arrays:
            return None
        return raw_3d(self.arrays, i).numpy()

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i = int(self.indices[item])
        raw = {name: torch.from_numpy(np.asarray(self.arrays[name][i]))  # the mmap's rows: collate copies
               for name in self._cached}
        return raw | self._sample(i)

    def __getitems__(self, items: list[int]) -> list[dict[str, torch.Tensor]]:
        """The items ``items`` at once (the DataLoader calls this with automatic batching): each
        cached array is gathered with one ``np.take`` into one batch tensor, whose rows the samples
        hold; the per-sample draws run in the same order, from the same streams, as ``self[j]``.
        :func:`collate` takes the batch tensors as they are instead of stacking the rows again (any
        other ``collate_fn`` still sees a list of samples). In a worker of a :class:`MERLoader` the
        arrays are left out: its main process gathers them (:meth:`fill`)."""
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        samples = [self._sample(int(i)) for i in rows]
        arrays = {} if self.arrays_in_main else self._gather(rows)
        for j, sample in enumerate(samples):
            sample.update({name: array[j] for name, array in arrays.items()})
        return _Batch(samples, arrays)

    def fill(self, batch: dict[str, Tensor], *, pin: bool = False) -> dict[str, Tensor]:
        """``batch`` with the cached arrays of its rows (``batch["index"]``), gathered here (``pin``:
        into pinned memory, for a fast copy to the GPU), where it lacks them."""
        return self._gather(batch["index"].numpy(), pin=pin, skip=batch) | batch

    def _gather(self, rows: np.ndarray, *, pin: bool = False, skip=()) -> dict[str, Tensor]:
        return {name: _take(self.arrays[name], rows, pin=pin) for name in self._cached if name not in skip}

    def _sample(self, i: int) -> dict[str, torch.Tensor]:
        """Manifest row ``i``'s drawn augmentation parameters, landmarks, flags and targets."""
        out = {}
        landmarks = np.array(self.arrays["landmarks"][i], np.float32) if "landmarks" in self.arrays else None
        if self.augment is not None:
            if self._parts_2d:
                side = self.arrays[self._parts_2d[0]].shape[1:3]
                params = self.augment.draw(*side, photometric=self._rgb["x2d"] is not None)
                out["aug2d"] = params_tensor(params)
                if landmarks is not None:  # the landmarks move with the 2D view they locate regions in
                    landmarks = move_points(landmarks, params, side[1], side[0])
            if "clip" in self.arrays:
                clip = self.arrays["clip"].shape[2:4]
                params = self.augment.draw(*clip, photometric=self._rgb["x3d"] is not None)
                out["aug3d"] = params_tensor(params)
        if landmarks is not None:
            out["landmarks"] = torch.from_numpy(landmarks)
        if self.tta == "hflip":  # the mirrored sample too (views.BatchViews): the model averages both
            out["tta"] = torch.tensor(True)
            if landmarks is not None:
                out["landmarks_flip"] = torch.from_numpy(hflip_points(landmarks))
        return {
            **out,
            "label": torch.tensor(self.labels[i], dtype=torch.long),
            "au": torch.from_numpy(self.au[i]),
            "au_mask": torch.from_numpy(self.au_mask[i]),
            "index": torch.tensor(i, dtype=torch.long),
        }

    def tensors(self, items: range | list[int], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Model inputs of these items as one batch on ``device`` (collated, moved, :attr:`views`)."""
        batch = collate(self.__getitems__(list(items)))
        return self.views({k: v.to(device) for k, v in batch.items()})


class MERDataModule(L.LightningDataModule):
    """One leave-one-subject-out fold of a protocol.

    Args:
        protocol: protocol name (``synth_4cls``, ``samm_5cls``, ``megc2019_3cls``; protocols.py).
        data_root: dataset root (frame folders, and the sheet unless ``annotation`` is given); for a
            composite, the folder holding one folder per dataset (``casme2/``, ``samm/``...) and the
            official list. For the synthetic protocol a missing dataset is generated here.
        annotation: sheet path overriding the protocol's pinned sheet in ``data_root``.
        annotations: per-dataset sheet paths for composites (``{casme2: FILE, list: FILE}``).
        roots: per-dataset roots for composites, overriding ``data_root/<dataset>``.
        datasets: keep only these datasets of a composite protocol.
        label_maps: per dataset, a replacement emotion -> class map (composites are configurable).
        classes: replacement class list (label order), with ``label_maps``.
        drop: sample ids to drop (logged in the manifest report).
        layout: on-disk layout (``raw``, ``cropped``); ``auto`` picks the one found on disk.
        split: fold groups: ``subject`` (LOSO) or ``dataset`` (leave-one-dataset-out).
        fold: index into the sorted group list; that group is the test set. ``-1``: none, every
            group trains (``famnet-pl train-final``: a final model; no test set).
        input_2d: 2D view: ``apex``, ``flow``, ``both`` (apex + flow), ``pair`` (onset + apex RGB, for
            FRL-DGT) or ``pair_flow`` (onset + apex + flow).
        clip_mode: 3D view: raw ``frames``, ``diff`` (each frame minus the onset frame) or ``flow``
            (flow + strain from the onset to each frame; own cache entry).
        image_size: side of the 2D view.
        clip_len: frames in the 3D view.
        clip_size: side of the 3D view.
        flow_algorithm: ``tvl1`` (default, MER standard), ``farneback`` or ``dis``.
        flow_size: side at which flow is computed before resizing to ``image_size``.
        apex_fix: non-numeric / out-of-clip / unannotated apex: ``midpoint`` or ``flow_peak``
            (flagged), or ``drop`` (manifest.py lists every rule).
        onset_eq_apex: onset == apex: ``keep`` (flagged), ``fix`` (as ``apex_fix``) or ``drop``.
        missing_frames: frames missing on disk: ``error`` or ``drop`` (listed in the report).
        official_lists: apply the dataset's official exclusion lists (CAS(ME)^3) found next to its sheet.
        register: align every frame to the onset frame (global translation, phase correlation)
            before flow and clips, removing head drift that is larger than the expression.
        face_detector: face crop detected on the onset frame and applied to every frame:
            ``none`` (frames already cropped: CASME II ``Cropped``, the synthetic set), ``auto``
            (``none`` where the layout found on disk holds face crops already, ``mtcnn`` elsewhere:
            the CASME II config's), ``mtcnn`` (offline model inside a pip wheel), ``center``, or one
            registered in face.py.
        face_margin: margin around the detected face (fraction of its side).
        face_align: rotate every frame of a clip so the onset frame's eyes are level.
        face_size: side of the face crop the views are resized from.
        flow_pair: ``onset_apex`` (standard) or ``apex_offset``.
        clip_fps: None: clips time-normalised over onset..offset; a number: frames 1/clip_fps s
            apart at each dataset's own fps (a common time scale for mixed 200/90/30 fps data).
        flow_norm: ``none`` (flow in pixels) or ``sample``: each flow view divided by its sample's
            root-mean-square displacement (the flow sequence by the whole sequence's), so every
            expression's motion is at one scale whatever its intensity (frames.normalise_motion).
        magnify: motion magnification of the RGB views (apex frame, frame clips): each frame's
            spatially low-passed intensity change against the onset frame, amplified this many times
            (frames.magnify; linear Eulerian magnification). 0: none. Flow views are unaffected.
        preprocess_workers: processes that fill the preprocessing cache (0: this process).
        strict: stop at the first sample whose frames are missing or unreadable instead of leaving
            it out and listing it.
        val_subjects: training subjects held out for inner validation, drawn per fold from that
            fold's training subjects only (never the test subject: this is the honest place for
            model and epoch selection): a count ``k`` (0 = none) or a fraction in (0, 1) of the
            training subjects. Composites draw per dataset: a fraction takes that share of each
            dataset's training subjects (at least one), a count is split across the datasets in
            proportion to their training subjects (largest remainders).
        batch_size: training batch size.
        num_workers: DataLoader workers (:class:`MERLoader`: they draw the augmentation and collate
            the targets; this process gathers the cached arrays). 0 is as fast on a 2-core CPU.
        augment: flip/translate/brightness on training samples, identical for every frame of a
            view (the 2D and the 3D view draw their parameters separately).
        tta: test-time augmentation of the evaluation samples (inner validation, test subject):
            ``hflip`` adds each sample mirrored (flow ``u`` negated, as the training flip), and the
            model averages the two predicted emotion distributions; ``none``: as they are.
        au_vocab: AU numbers for the AU head; default: the dataset's vocabulary.
        cache_dir: where decoded arrays are cached.
        seed: seed of the augmentation stream and of the inner-validation draw.
    """

    #: Protocols this class accepts (empty: every protocol); set by the per-dataset subclasses.
    protocols: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        protocol: str = "synth_4cls",
        data_root: str = "data/synth",
        annotation: str | None = None,
        annotations: dict[str, str] | None = None,
        roots: dict[str, str] | None = None,
        datasets: list[str] | None = None,
        label_maps: dict[str, dict[str, str]] | None = None,
        classes: list[str] | None = None,
        drop: list[str] | None = None,
        layout: str = "auto",
        split: Literal["subject", "dataset"] = "subject",
        fold: int = 0,
        input_2d: Literal["apex", "flow", "both", "pair", "pair_flow"] = "flow",
        clip_mode: Literal["frames", "diff", "flow"] = "frames",
        image_size: int = 64,
        clip_len: int = 8,
        clip_size: int = 48,
        flow_algorithm: FlowAlgorithm = "tvl1",
        flow_size: int = 128,
        apex_fix: ApexFix = "midpoint",
        onset_eq_apex: Literal["keep", "fix", "drop"] = "keep",
        missing_frames: Literal["error", "drop"] = "error",
        official_lists: bool = True,
        register: bool = True,
        face_detector: str = "none",
        face_margin: float = 0.15,
        face_align: bool = False,
        face_size: int = 256,
        flow_pair: Literal["onset_apex", "apex_offset"] = "onset_apex",
        clip_fps: float | None = None,
        flow_norm: Literal["none", "sample"] = "none",
        magnify: float = 0.0,
        preprocess_workers: int = 0,
        strict: bool = False,
        val_subjects: int | float = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        augment: bool = True,
        tta: Literal["none", "hflip"] = "none",
        au_vocab: list[int] | None = None,
        cache_dir: str = ".cache/famnet_pl",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.check_protocol(protocol)
        self.save_hyperparameters()
        self.protocol = get_protocol(protocol, datasets=datasets, label_maps=label_maps, classes=classes)
        self.au_vocab = tuple(au_vocab) if au_vocab is not None else self.protocol.vocab
        if "onset" in VIEWS_2D[input_2d] and not self.protocol.has_clips:
            raise ProtocolError(
                f"protocol {self.protocol.name} has precomputed flow images only, no onset or apex frames, "
                f"and data.input_2d={input_2d} (FRL-DGT) needs both frames: run it on the frame-based "
                "protocol (megc2019_3cls, with the datasets' frame folders)")
        self.manifest: pd.DataFrame | None = None  # the samples in use: validated and preprocessed
        self._validated: pd.DataFrame | None = None
        self._layouts: dict[str, str] = {}  # dataset -> layout found on disk (load_manifest)
        self.prepared: Prepared | None = None
        self.test_subject: str | None = None
        self._resume_state: dict = {}  # from a resume checkpoint (load_state_dict)
        #: The batch views the model reads (use_inputs); only these are built, cached and batched.
        self.inputs: tuple[str, ...] = ("x2d", "x3d")
        self._shuffle_generator: torch.Generator | None = None

    def use_inputs(self, inputs: tuple[str, ...] | list[str]) -> None:
        """Build only the views the model reads (``MERLitModule.inputs``: ``x2d``, ``x3d``): a 2D-only
        model gets no clip, a 3D-only one no 2D view. The CLI calls this once both exist, before
        anything is preprocessed."""
        inputs = tuple(inputs)
        unknown = set(inputs) - {"x2d", "x3d"}
        if unknown or not inputs:
            raise ValueError(f"model inputs {inputs}: expected a non-empty subset of ('x2d', 'x3d')")
        if self.prepared is not None and inputs != self.inputs:
            raise RuntimeError(f"the views were built for {self.inputs} already; set the model's inputs "
                               "first")
        self.inputs = inputs

    @classmethod
    def check_protocol(cls, protocol: str) -> None:
        """ProtocolError, one line naming the allowed protocols, unless this class takes ``protocol``."""
        if not cls.protocols or protocol in cls.protocols:
            return
        owner = next((c.__name__ for c in MERDataModule.__subclasses__() if protocol in c.protocols),
                     "MERDataModule" if protocol in PROTOCOLS else None)
        raise ProtocolError(f"{cls.__name__}: protocol {protocol!r} is not one of {', '.join(cls.protocols)}"
                            + (f"; use {owner} for it" if owner else ""))

    # Static facts, known before setup, linked into the model config by the CLI.
    @property
    def num_classes(self) -> int:
        """Classes of the protocol."""
        return self.protocol.num_classes

    @property
    def num_aus(self) -> int:
        """Size of the AU vocabulary."""
        return len(self.au_vocab)

    @property
    def in_channels_2d(self) -> int:
        """Channels of the 2D view."""
        return INPUT_2D_CHANNELS[self.hparams.input_2d]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return self.protocol.classes

    @property
    def _fold_seed(self) -> int:
        """Seed of this fold's augmentation and shuffling streams."""
        return self.hparams.seed * 1000 + _stream_fold(self.hparams.fold)

    def prepare_data(self) -> None:
        """Generate the synthetic dataset if this protocol uses it and the root holds none (or one
        written by an older generator); a complete set of any spec is used as it is."""
        if self.protocol.dataset == "synth":
            synthetic.ensure(self.hparams.data_root)

    @property
    def run_name(self) -> str:
        """Folder of this protocol's runs: the dataset, or the protocol for composites (``_lodo``
        appended for leave-one-dataset-out)."""
        name = self.protocol.name if self.protocol.composite else self.protocol.dataset
        return f"{name}_lodo" if self.hparams.split == "dataset" else name

    def load_manifest(self) -> pd.DataFrame:
        """Build (once per process and configuration) and return the protocol's validated manifest."""
        if self._validated is None:
            self.prepare_data()
            hp = self.hparams
            options = {k: hp[k] for k in ("annotation", "annotations", "roots", "datasets", "label_maps",
                                          "classes", "drop", "layout", "apex_fix", "onset_eq_apex",
                                          "missing_frames", "official_lists")}
            # Sheet modification times are part of the memo key: an edited sheet is read again.
            options["_stamp"] = _sheet_stamps(self.protocol, hp.data_root, hp.annotation, hp.annotations,
                                              hp.roots)
            self._validated, self._layouts = _manifest(self.protocol.name, str(hp.data_root),
                                                       json.dumps(options, sort_keys=True))
        return self._validated

    @property
    def face_detector(self) -> str:
        """The face detector in use: ``face_detector``, where ``auto`` is ``none`` when every dataset's
        frames are face crops already (CASME II ``Cropped``, the synthetic set; protocols.Layout) and
        ``mtcnn`` otherwise."""
        detector = self.hparams.face_detector
        if detector != "auto":
            return detector
        self.load_manifest()
        crops = all(get_dataset(d).layout(name).face_crops for d, name in self._layouts.items())
        return "none" if crops else "mtcnn"

    @property
    def views(self) -> ViewConfig:
        """The preprocessing configuration (everything in it is part of the cache key): the views of
        :attr:`inputs` only."""
        hp = self.hparams
        parts = VIEWS_2D[hp.input_2d] if "x2d" in self.inputs else ()
        return ViewConfig(image_size=hp.image_size, clip_len=hp.clip_len, clip_size=hp.clip_size,
                          flow_algorithm=hp.flow_algorithm, flow_size=hp.flow_size,
                          need_flow="flow" in parts, need_onset="onset" in parts, need_apex="apex" in parts,
                          register=hp.register, need_clip=self.protocol.has_clips and "x3d" in self.inputs,
                          face_detector=self.face_detector, face_margin=hp.face_margin,
                          face_align=hp.face_align, face_size=hp.face_size, flow_pair=hp.flow_pair,
                          clip_fps=hp.clip_fps, clip_view="flow" if hp.clip_mode == "flow" else "frames",
                          flow_norm=hp.flow_norm, magnify=hp.magnify)

    def prepare(self) -> Prepared:
        """Preprocess every sample once (cached; parallel with ``preprocess_workers``) and keep the
        samples that succeeded; those that failed are logged with the file at fault."""
        if self.prepared is None:
            hp = self.hparams
            validated = self.load_manifest()
            self.prepared = preprocess(validated, hp.data_root, self.views, hp.cache_dir,
                                       workers=hp.preprocess_workers, strict=hp.strict)
            if self.prepared.no_face:
                log.warning("no face found in %d samples (the fallback crop was used), e.g. %s",
                            len(self.prepared.no_face), self.prepared.no_face[:5])
            if self.prepared.failures:
                log.warning("%d of %d samples left out (frames missing or unreadable; --data.strict=true "
                            "stops instead):\n%s", len(self.prepared.failures), len(validated),
                            "\n".join(f"  {k}: {v}" for k, v in self.prepared.failures.items()))
            self.manifest = validated[self.prepared.ok].reset_index(drop=True)
        return self.prepared

    def dropped(self) -> list[dict]:
        """Samples left out at preprocessing (frames missing or unreadable): id, subject and the error
        naming the file; recorded with every fold and in the run's summary."""
        prepared, validated = self.prepare(), self.load_manifest()
        subject = dict(zip(validated["sample_id"], validated["subject"]))
        return [{"sample_id": k, "subject": subject.get(k), "error": v}
                for k, v in sorted(prepared.failures.items())]

    @property
    def group_column(self) -> str:
        """Manifest column whose values are the folds."""
        return "subject" if self.hparams.split == "subject" else "dataset"

    def subjects(self) -> list[str]:
        """Sorted fold groups (namespaced subject ids, or datasets): fold ``k`` tests ``subjects()[k]``."""
        # From the validated manifest, so fold k tests the same group whichever samples fail to load.
        return sorted(self.load_manifest()[self.group_column].unique())

    def setup(self, stage: str | None = None) -> None:
        """Load arrays and split train / (val) / test for ``fold``."""
        if getattr(self, "_ready", False):
            return
        hp = self.hparams
        arrays = self.prepare().arrays
        manifest, subjects = self.manifest, self.subjects()
        if not -1 <= hp.fold < len(subjects):
            raise ProtocolError(f"fold {hp.fold} out of range: protocol {self.protocol.name} has "
                             f"{len(subjects)} subjects (folds 0..{len(subjects) - 1}; -1: none held out)")
        self.test_subject = subjects[hp.fold] if hp.fold >= 0 else None  # -1: a final model, no test group
        if self.test_subject is not None and not (manifest[self.group_column] == self.test_subject).any():
            raise ProtocolError(f"fold {hp.fold}: every sample of {self.test_subject} was left out in "
                             "preprocessing (see the warning above); restore its frames or drop the subject")
        # Composites: an AU a sample's dataset never codes is masked, not read as "absent".
        coded = [get_dataset(d).au_coded for d in manifest["dataset"]] if self.protocol.composite else None
        au, au_mask = au_targets([parse_au_set(a) for a in manifest["au_set"]],
                                 manifest["au_unknown"].to_numpy(dtype=bool), self.au_vocab, coded)
        labels = manifest["label"].to_numpy()

        group_of = manifest[self.group_column].to_numpy()  # = subject, or dataset (leave-one-dataset-out)
        test_idx = np.flatnonzero(group_of == self.test_subject)
        train_subjects = [s for s in subjects if s != self.test_subject]
        # Inner validation holds out training *subjects* under either split (not whole datasets).
        subject_of = manifest["subject"].to_numpy()
        pool = (train_subjects if self.group_column == "subject"
                else sorted(set(subject_of[group_of != self.test_subject])))
        val_subjects = self._inner_validation(pool)
        in_val = np.isin(subject_of, val_subjects)
        val_idx = np.flatnonzero(in_val)
        train_idx = np.flatnonzero(~in_val & (group_of != self.test_subject))

        def make(idx: np.ndarray, augment: ClipAugment | None, stats: dict, tta: str = "none") -> MERDataset:
            return MERDataset(arrays, idx, labels, au, au_mask, input_2d=hp.input_2d,
                              clip_mode=hp.clip_mode, stats=stats, augment=augment, tta=tta)

        stats = _channel_stats(make(train_idx, None, {}), train_idx)
        augmenter = ClipAugment(seed=self._fold_seed) if hp.augment else None
        self.train_set = make(train_idx, augmenter, stats)
        self.val_set = make(val_idx, None, stats, hp.tta) if len(val_idx) else None
        self.test_set = make(test_idx, None, stats, hp.tta) if self.test_subject is not None else None
        self.split = {"train": [s for s in train_subjects if s not in val_subjects],
                      "val": list(val_subjects), "test": [self.test_subject] if self.test_subject else []}
        if au[train_idx].sum() == 0 and self.num_aus:
            log.warning("fold %d: every AU target of the training set is 0; check the AU column and "
                        "vocabulary %s", hp.fold, self.au_vocab)
        self._ready = True

    def _inner_validation(self, train_subjects: list[str]) -> list[str]:
        """This fold's inner-validation subjects (``val_subjects``), from its training subjects."""
        hp, n = self.hparams, len(train_subjects)
        k = hp.val_subjects
        fraction = isinstance(k, float) and not float(k).is_integer()
        if not (0 < k < 1 if fraction else 0 <= k < n):
            raise ProtocolError(f"data.val_subjects={k}: needs a count 0 <= k < {n} (the training subjects "
                                "of this fold) or a fraction 0 < f < 1 of them")
        if not k:
            return []
        rng = np.random.default_rng([hp.seed, _stream_fold(hp.fold)])
        datasets = sorted({s.split("/")[0] for s in train_subjects})
        if len(datasets) == 1:
            size = max(1, round(k * n)) if fraction else int(k)
            return sorted(rng.choice(train_subjects, size=min(size, n - 1), replace=False).tolist())
        # A composite: each dataset keeps its share of inner-validation subjects, so validation
        # scores weigh the datasets as the test pool does.
        groups = {d: [s for s in train_subjects if s.split("/")[0] == d] for d in datasets}
        if fraction:
            sizes = {d: min(max(1, round(k * len(g))), len(g) - 1) for d, g in groups.items()}
        else:
            quota = {d: int(k) * len(g) / n for d, g in groups.items()}
            sizes = {d: int(q) for d, q in quota.items()}
            for d in sorted(quota, key=lambda d: (sizes[d] - quota[d], d))[:int(k) - sum(sizes.values())]:
                sizes[d] += 1
        return sorted(s for d in datasets
                      for s in rng.choice(groups[d], size=sizes[d], replace=False).tolist())

    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self._fold_seed)
        if shuffle:  # the training order stream: part of the resume state
            if self._resume_state.get("shuffle") is not None:
                generator.set_state(self._resume_state["shuffle"])
            self._shuffle_generator = generator
        # A last training batch of one sample would stop batch norm ("expected more than 1 value per
        # channel"): that one sample waits for the next epoch's shuffle instead.
        drop_last = shuffle and len(dataset) % self.hparams.batch_size == 1
        return MERLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, drop_last=drop_last,
                         num_workers=self.hparams.num_workers, generator=generator, collate_fn=collate,
                         worker_init_fn=init_worker, persistent_workers=self.hparams.num_workers > 0,
                         pin_memory=torch.cuda.is_available())

    def state_dict(self) -> dict:
        """Random streams of the training data (shuffling, augmentation) at a checkpoint, so a fold
        resumed from it sees the same batches as an uninterrupted one (``num_workers=0``; worker
        processes keep their augmentation streams to themselves)."""
        augment = getattr(self.train_set, "augment", None)
        generator = self._shuffle_generator
        return {"shuffle": generator.get_state() if generator is not None else None,
                "augment": augment.get_state() if augment is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (Lightning calls it after ``setup``, before the loaders exist)."""
        self._resume_state = dict(state_dict)
        augment = getattr(self.train_set, "augment", None)
        if augment is not None and state_dict.get("augment") is not None:
            augment.set_state(state_dict["augment"])

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        """Model inputs from the raw batch, on its device (data/views.py): Lightning calls this after
        moving every training, validation and test batch; so does whoever iterates the loaders."""
        return self.train_set.views(batch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training subjects."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self, shard: tuple[int, int] | None = None) -> DataLoader | list:
        """Inner validation subjects (empty when ``val_subjects=0``); ``shard`` as in
        :meth:`test_dataloader`."""
        return self._eval_loader(self.val_set, shard) if self.val_set is not None else []

    def test_dataloader(self, shard: tuple[int, int] | None = None) -> DataLoader:
        """The test subject, in manifest order; ``shard=(rank, world)``: every ``world``-th sample
        from ``rank`` on, no padding (unlike a DistributedSampler, which repeats samples)."""
        if self.test_set is None:
            raise ProtocolError("data.fold=-1 holds no test subject out (a final model): there is no "
                                "test set")
        return self._eval_loader(self.test_set, shard)

    def _eval_loader(self, dataset: Dataset, shard: tuple[int, int] | None) -> DataLoader:
        if shard is None:
            return self._loader(dataset, shuffle=False)
        rank, world = shard
        return self._loader(Subset(dataset, range(rank, len(dataset), world)), shuffle=False)


# --- one DataModule per dataset ----------------------------------------------------------------
# Each fixes its dataset (the protocols it accepts, defaults for protocol and root) and takes every
# other MERDataModule option unchanged (LightningCLI reads them through ``**kwargs``):
#   data: {class_path: famnet_pl.data.datamodule.CASME2DataModule, init_args: {data_root: ...}}
# or ``--data CASME2DataModule`` on the command line.


class CASME2DataModule(MERDataModule):
    """CASME II (experiments/data/casme2.yaml): ``casme2_5cls`` (default), ``casme2_5cls_2019``,
    ``casme2_3cls`` or ``casme2`` (every sample); see :class:`MERDataModule` for the other options."""

    protocols = dataset_protocols("casme2")

    def __init__(self, protocol: str = "casme2_5cls", data_root: str = "data/CASME2", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class SAMMDataModule(MERDataModule):
    """SAMM (experiments/data/samm.yaml): ``samm_5cls`` (default), ``samm_3cls`` or ``samm``."""

    protocols = dataset_protocols("samm")

    def __init__(self, protocol: str = "samm_5cls", data_root: str = "data/SAMM", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class MMEWDataModule(MERDataModule):
    """MMEW (experiments/data/mmew.yaml): ``mmew_6cls`` (default; alias ``mmew``), ``mmew_5cls``,
    ``mmew_4cls`` or ``mmew_3cls``."""

    protocols = dataset_protocols("mmew")

    def __init__(self, protocol: str = "mmew_6cls", data_root: str = "data/MMEW", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class CASME3DataModule(MERDataModule):
    """CAS(ME)^3 Part A (experiments/data/casme3.yaml): ``casme3_4cls`` (default), ``casme3_7cls``
    (alias ``casme3``), ``casme3_3cls`` or ``casme3_3cls_687``."""

    protocols = dataset_protocols("casme3")

    def __init__(self, protocol: str = "casme3_4cls", data_root: str = "data/CASME3", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class SMICDataModule(MERDataModule):
    """SMIC-HS (experiments/data/smic.yaml): ``smic_3cls`` (alias ``smic``)."""

    protocols = dataset_protocols("smic")

    def __init__(self, protocol: str = "smic_3cls", data_root: str = "data/SMIC", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class MEGC2019DataModule(MERDataModule):
    """The MEGC2019 composite benchmark (CASME II + SAMM + SMIC, the official 442 samples) in either
    release: ``megc2019_3cls`` (default; the datasets' frames, experiments/data/megc2019.yaml) or
    ``megc2019_flow_3cls`` (precomputed flow images, no 3D view; experiments/data/megc2019_flow.yaml)."""

    protocols = ("megc2019_3cls", *dataset_protocols("megc2019_flow"))

    def __init__(self, protocol: str = "megc2019_3cls", data_root: str = "data/megc2019", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)


class SynthDataModule(MERDataModule):
    """The built-in synthetic set (experiments/data/synth.yaml, the default run): ``synth_4cls``,
    generated into ``data_root`` on first use; ``size``: ``demo`` (8 subjects) or ``casme2`` (26
    subjects, experiments/data/synth_casme2.yaml; synthetic.SIZES), used when ``data_root`` holds none."""

    protocols = dataset_protocols("synth")

    def __init__(self, protocol: str = "synth_4cls", data_root: str = "data/synth",
                 size: Literal["demo", "casme2"] = "demo", **kwargs) -> None:
        super().__init__(protocol=protocol, data_root=data_root, **kwargs)
        self.size = size

    def prepare_data(self) -> None:
        synthetic.ensure(self.hparams.data_root, self.size)

    @property
    def run_name(self) -> str:
        """``synth``, or ``synth_casme2`` for the CASME II-sized set (its runs stay apart)."""
        name = super().run_name
        return name if self.size == "demo" else name.replace("synth", f"synth_{self.size}", 1)


@functools.lru_cache(maxsize=8)
def _manifest(protocol: str, root: str, options_json: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """Manifest memo: the LOSO runner builds one DataModule per fold in one process, and the sheet
    and frame checks (and their report) need to happen once, not once per fold. ``options_json``
    holds the manifest options (hashable). Returns the manifest and the layout of each dataset."""
    options = json.loads(options_json)
    options.pop("_stamp")
    proto = get_protocol(protocol, datasets=options.pop("datasets"), label_maps=options.pop("label_maps"),
                         classes=options.pop("classes"))
    manifest, report = build_manifest(protocol=proto, root=root, **options)
    log.info("manifest:\n%s", report.format())
    return manifest, dict(report.layouts)


def _sheet_stamps(protocol, root, annotation, annotations, roots) -> list:
    """Modification times of every annotation file the manifest may read: each part's sheet folder
    (sheet, official exclusion lists), the data root (official sample list) and given files."""
    folders, files = {Path(root)}, [Path(p) for p in (annotations or {}).values()]
    for part in protocol.parts:
        base = part_root(protocol, part.dataset, root, roots)
        try:
            sheet = part_sheet(protocol, part, base, annotation, annotations)
        except ManifestError:
            sheet = None
        if sheet is not None:
            folders.add(sheet.parent)
        elif base is not None:
            files.append(base / "HS")  # SMIC: the frame tree is the annotation
    files += [p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file()]
    return sorted((str(p), p.stat().st_mtime_ns) for p in set(files) if p.exists())


def _stream_fold(fold: int) -> int:
    """The fold index in random streams; a final model (``fold=-1``) gets its own (999)."""
    return fold if fold >= 0 else 999


def _channel_stats(dataset: MERDataset, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel mean/std of both views over the given (training) rows."""
    # The rows at once (the values and layout of np.stack over view_2d / view_3d, so the same sums).
    rows, stats = np.asarray(idx), {}
    if dataset.has_2d:
        x2d = raw_2d(dataset.arrays, dataset.input_2d, rows).numpy()
        stats |= {"mean_2d": x2d.mean(axis=(0, 1, 2)), "std_2d": x2d.std(axis=(0, 1, 2)) + 1e-6}
    if "clip" in dataset.arrays:
        x3d = raw_3d(dataset.arrays, rows).numpy()
        stats |= {"mean_3d": x3d.mean(axis=(0, 1, 2, 3)), "std_3d": x3d.std(axis=(0, 1, 2, 3)) + 1e-6}
    return stats


def _take(array: np.ndarray, rows: np.ndarray, *, pin: bool = False) -> Tensor:
    """``array[rows]`` as a new tensor (``pin``: in pinned memory)."""
    dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
    out = torch.empty((len(rows), *array.shape[1:]), dtype=dtype, pin_memory=pin)
    # mode="clip": with the default "raise", numpy gathers into a temporary and copies that into
    # ``out`` (a second full-size copy); the rows are the dataset's own, so always in range
    np.take(array, rows, axis=0, out=out.numpy(), mode="clip")
    return out


class _Batch(list):
    """:meth:`MERDataset.__getitems__`'s samples, with the batch tensors their cached arrays are rows
    of (``arrays``)."""

    def __init__(self, samples: list[dict[str, Tensor]], arrays: dict[str, Tensor]) -> None:
        super().__init__(samples)
        self.arrays = arrays


def collate(batch: list) -> dict[str, Tensor]:
    """The DataLoader ``collate_fn`` for MERDataset: ``default_collate``, except that the cached
    arrays of a :meth:`MERDataset.__getitems__` batch are its gathered tensors, not stacked again."""
    if not isinstance(batch, _Batch):
        return default_collate(batch)
    arrays = batch.arrays
    return arrays | default_collate([{k: v for k, v in s.items() if k not in arrays} for s in batch])


def _base(dataset: Dataset) -> Dataset:
    """The dataset under any Subset wrappers (the evaluation shards)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class MERLoader(DataLoader):
    """A DataLoader over a MERDataset (or a Subset of one) whose workers do the per-sample work
    (augmentation draws, targets) and whose main process gathers the cached arrays of each batch.

    Why: a worker's batch travels to the main process in a fresh shared-memory segment, and writing
    the 24 MB of a full-size batch into fresh pages costs about 25 ms in a worker here (page faults),
    against 4-7 ms for one ``np.take`` per array from the cache's memory map in the main process. So
    the bytes never cross processes (bench/loader.py). Needs ``worker_init_fn=init_worker``; with
    ``num_workers=0`` it is a plain DataLoader.
    """

    def __iter__(self):
        it = super().__iter__()
        if self.num_workers == 0:
            return it
        # pinned only where the DataLoader pins (it turns pin_memory off without CUDA)
        return _Filled(it, _base(self.dataset), self.pin_memory and torch.cuda.is_available())


class _Filled:
    """A MERLoader's iterator: the worker batches with their cached arrays filled in."""

    def __init__(self, it, dataset: MERDataset, pin: bool) -> None:
        self._it, self._dataset, self._pin = it, dataset, pin

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Tensor]:
        return self._dataset.fill(next(self._it), pin=self._pin)

    def __len__(self) -> int:
        return len(self._it)

    def __getstate__(self) -> dict:
        # as Lightning's loop iterators drop a DataLoader iterator when pickled (it cannot be)
        return {**self.__dict__, "_it": None}


def init_worker(worker_id: int) -> None:
    """A MERLoader worker: batches without the cached arrays, and its own augmentation stream."""
    info = get_worker_info()
    dataset = _base(info.dataset)
    dataset.arrays_in_main = True
    augment = getattr(dataset, "augment", None)
    if augment is not None:
        augment.reseed(info.seed % (2**31))
