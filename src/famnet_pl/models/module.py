"""MERLitModule: training logic around any registered network (FAMNet and its branches, FRL-DGT,
STSTNet, ...).

Data flow per step::

    batch {"x2d", "x3d", "label", "au", "au_mask"[, "landmarks"]} -> net(x2d, x3d[, landmarks]) -> outputs
        -> WeightedMultiTaskLoss(model.loss_weights) -> loss ; outputs["emotion"] -> per-stage torchmetrics

The network comes from the model registry by name (``model: famnet_r18``), with its own options in
``net`` (widths, attention, fusion...; see ``famnet_pl.models.famnet.FAMNet``). ``num_classes``,
``num_aus`` and ``in_channels_2d`` are linked from the DataModule by the CLI, so a config states
them once. Every loss weight is in ``loss_weights``, a model's self-supervised terms included
(FRL-DGT's ``dgm_*``): the network returns those unweighted and computes only the ones whose weight
is non-zero, which this module tells it. Metric objects are separate per stage (correct reduction
across processes). Logged per-stage metrics are for monitoring only: LOSO results are recomputed
from prediction files.

``FAMNetLitModule`` is the former name, kept as an alias of the same class: configs with
``class_path: famnet_pl.models.module.FAMNetLitModule`` and ``FAMNetLitModule.load_from_checkpoint``
keep working.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from famnet_pl.losses import LossWeights, WeightedMultiTaskLoss
from famnet_pl.metrics import fold_scores
from famnet_pl.models.components.fusion import late_fusion
from famnet_pl.models.registry import create_model

log = logging.getLogger(__name__)


def _uf1(pred: Tensor, label: Tensor) -> float:
    """Macro F1 over the classes present in targets or predictions (as the per-stage metrics)."""
    return fold_scores(label.cpu().numpy(), pred.cpu().numpy())["uf1"]


def _stage_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection({
        "uf1": MulticlassF1Score(num_classes, average="macro"),
        "uar": MulticlassRecall(num_classes, average="macro"),
        "acc": MulticlassAccuracy(num_classes, average="micro"),
    }, prefix=prefix)


class MERLitModule(L.LightningModule):
    """Multi-task MER training (emotion + AU, plus a model's self-supervised terms) for every
    registered network.

    Args:
        model: registry name (``famnet_r18``, ``amnet2d_r18``, ``amnet3d_r18``; the comparison
            models ``frl_dgt`` and ``ststnet``).
        net: extra keyword arguments of the registry factory (widths, attention, fusion, ...).
        num_classes: emotion classes (linked from ``data.num_classes``).
        num_aus: AU vocabulary size (linked from ``data.num_aus``); 0 disables the AU heads.
        in_channels_2d: channels of the 2D view (linked from ``data.in_channels_2d``).
        loss_weights: weights of every loss term (losses.py ``LossWeights``): the emotion and AU
            terms, and the models' self-supervised terms (FRL-DGT: ``dgm_photo``, ``dgm_smooth``,
            ``dgm_flow``; also used by ``pretrain_steps``).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        scheduler: ``cosine`` (to 0 over ``trainer.max_epochs``, after ``warmup_epochs`` linear
            warm-up) or ``none``. The schedule depends only on the epoch count, never on a metric.
        warmup_epochs: linear warm-up length.
        pretrain_steps: self-supervised pre-training steps of the model's displacement module
            (FRL-DGT's ``dgm``) on this fold's *training* pairs (never the test subject), before the
            classifier trains; 0: none (trained jointly from the start). Its loss has the same
            weights as the joint training (``loss_weights.dgm_*``). With ``net.dgm_mode: frozen``
            the pre-trained module then stays fixed.
        late_weight_from: FAMNet's late-fusion weight: ``config`` (``net.late_weight``) or ``val``
            (no effect on single-branch models):
            after every validation epoch, the weight in {0, 0.1, ..., 1} whose fused predictions
            score the best inner-validation UF1 (ties: lowest validation NLL), so the fused
            prediction is never worse on validation than the better branch (w = 0 and 1 are the
            branches alone). Needs ``data.val_subjects >= 1`` (without, ``net.late_weight`` is kept
            and a warning says so) and validation every epoch; the test subject is never read. The
            weight is a buffer of the network, saved in checkpoints.
        balance: ``classes``: every emotion cross-entropy weighs class ``c`` by ``n / (C * n_c)`` of
            this fold's training labels (each class counts equally, as in UF1 and UAR; real datasets
            are imbalanced, CASME II 5-class from 25 to 99 clips a class); ``none``: unweighted.
        label_smoothing: label smoothing of every emotion cross-entropy (0: none): the target puts
            this much probability mass uniformly on all classes, so a handful of training subjects
            cannot drive the logits to certainty.
        schedule_epochs: length of the learning-rate schedule in epochs (None: ``trainer.max_epochs``).
            ``famnet-pl train-final --from-run`` trains a LOSO run's schedule up to its
            validation-selected epoch: ``max_epochs`` = that epoch + 1, ``schedule_epochs`` = the run's.
        channels_last: keep the network's 4D weights channels-last and its 5D weights
            channels-last-3d, and feed its inputs so (GPU tensor cores prefer NHWC; on CPU usually
            no faster). Changes nothing but speed (and float summation order).
        compile: ``torch.compile`` the network's forward (``nn.Module.compile``: the weights and
            checkpoint keys stay as they are). The first steps compile (tens of seconds); worth it
            on a GPU for long runs, rarely for a CPU LOSO of small folds.
    """

    def __init__(
        self,
        model: str = "famnet_r18",
        net: dict[str, Any] | None = None,
        num_classes: int = 4,
        num_aus: int = 0,
        in_channels_2d: int = 3,
        loss_weights: LossWeights = LossWeights(),
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: int = 0,
        pretrain_steps: int = 0,
        late_weight_from: Literal["config", "val"] = "config",
        balance: Literal["none", "classes"] = "none",
        label_smoothing: float = 0.0,
        schedule_epochs: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_model(model, num_classes=num_classes, num_aus=num_aus,
                                in_channels_2d=in_channels_2d, **(net or {}))
        self.criterion = WeightedMultiTaskLoss(loss_weights, label_smoothing)
        if hasattr(self.net, "active_aux_losses"):
            # The network computes only the self-supervised terms that count: one whose weight is 0
            # (FRL-DGT's flow guidance off) costs nothing, as when the weights were network options.
            self.net.active_aux_losses = tuple(name for name, w in self.aux_loss_weights().items() if w)
        fusion = getattr(self.net, "fusion", None)
        if late_weight_from == "val" and getattr(fusion, "mode", "late") != "late":
            # Single-branch models have nothing to fuse: the option has no effect there (ablations).
            raise ValueError(f"model.late_weight_from=val chooses the weight of late fusion, and net.fusion "
                             f"is {fusion.mode}: set --model.late_weight_from=config or "
                             "--model.net.fusion=late")
        self._val_outputs: list[dict[str, Tensor]] = []
        self._epoch_sums: dict[str, dict[str, Tensor]] = {}  # stage -> loss term -> sum over the epoch
        self._takes_landmarks = "landmarks" in inspect.signature(self.net.forward).parameters
        if channels_last:
            _to_channels_last(self.net)
        if compile:
            self.net.compile()
        # One metric object per stage: they reduce separately (lightning-hydra-template idiom).
        self.train_metrics = _stage_metrics(num_classes, "train/")
        self.val_metrics = _stage_metrics(num_classes, "val/")
        self.test_metrics = _stage_metrics(num_classes, "test/")

    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each self-supervised term the network can return (its ``AUX_LOSSES``; none for
        most models), from ``loss_weights``: for the training loss and the pre-training alike."""
        return {name: self.criterion.weights.aux_weight(name) for name in getattr(self.net, "AUX_LOSSES", ())}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch views the network reads (``x2d``, ``x3d``): its ``inputs`` attribute, or both for
        a network that declares none. The CLI tells the DataModule, which builds only these."""
        return tuple(getattr(self.net, "inputs", ("x2d", "x3d")))

    @property
    def trains_au(self) -> bool:
        """Whether an AU head exists and its loss term is on (``wau > 0``): only then are AU
        probabilities predicted and scored (an untrained head's outputs mean nothing)."""
        return self.hparams.num_aus > 0 and self.criterion.weights.wau > 0

    def on_fit_start(self) -> None:
        """Set the class weights (``balance``) from this fold's training labels, and pre-train the
        displacement module (``pretrain_steps``; not when resuming from a checkpoint, which holds the
        weights already)."""
        if (self.hparams.late_weight_from == "val" and getattr(self.net, "fusion", None) is not None
                and getattr(self.trainer.datamodule, "val_set", None) is None):
            log.warning("model.late_weight_from=val but there are no inner-validation subjects "
                        "(data.val_subjects=0): late fusion keeps net.late_weight=%.2f; "
                        "set --data.val_subjects=1 (or more) to choose it",
                        float(self.net.fusion.late_weight))
        if self.hparams.get("balance", "none") == "classes":
            self.criterion.class_weight = class_balance(self.trainer.datamodule.train_set,
                                                        self.hparams.num_classes, self.device)
        steps = self.hparams.pretrain_steps
        if not steps or self.trainer.ckpt_path is not None:
            return
        from famnet_pl.models.components.frl_dgt import pretrain_displacement

        dgm = getattr(self.net, "dgm", None)
        if dgm is None:
            raise ValueError(f"model.pretrain_steps={steps} needs a model with a displacement module "
                             f"(frl_dgt); {self.hparams.model} has none")
        train = self.trainer.datamodule.train_set
        augment, train.augment = train.augment, None  # the pairs as they are: no augmentation draws
        try:
            x = train.tensors(range(len(train)), self.device)["x2d"]
        finally:
            train.augment = augment
        frozen = not any(p.requires_grad for p in dgm.parameters())
        dgm.requires_grad_(True)
        options = getattr(self.net, "loss_options", {})  # how the terms are computed (edge_alpha, ...)
        self.pretrain_history = pretrain_displacement(
            dgm, x[:, 0:3], x[:, 3:6], flow=x[:, 6:8] if x.shape[1] >= 8 else None, steps=steps,
            weights=self.aux_loss_weights(), seed=self.trainer.datamodule.hparams.fold, **options)
        dgm.requires_grad_(not frozen)

    def forward(self, x2d: Tensor | None = None, x3d: Tensor | None = None,
                landmarks: Tensor | None = None) -> dict[str, Tensor]:
        """Network outputs (see FAMNet.forward); ``landmarks`` (the data's, with a face detector) go to
        networks that place regions from them (FRL-DGT)."""
        if self.hparams.get("channels_last"):
            x2d = x2d.contiguous(memory_format=torch.channels_last) if x2d is not None else None
            x3d = x3d.contiguous(memory_format=torch.channels_last_3d) if x3d is not None else None
        if landmarks is not None and self._takes_landmarks:
            return self.net(x2d=x2d, x3d=x3d, landmarks=landmarks)
        return self.net(x2d=x2d, x3d=x3d)

    def _outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Network outputs; with a mirrored copy of the batch (``data.tta=hflip``: ``x2d_flip``...),
        every emotion output is the log of the mean of the two softmaxes (late fusion is linear in
        the branch probabilities, so the fused output is the fusion of the averaged branches)."""
        outputs = self(batch.get("x2d"), batch.get("x3d"), batch.get("landmarks"))
        if "x2d_flip" not in batch and "x3d_flip" not in batch:
            return outputs
        mirrored = self(batch.get("x2d_flip"), batch.get("x3d_flip"), batch.get("landmarks_flip"))
        return outputs | {key: late_fusion(value, mirrored[key], 0.5) for key, value in outputs.items()
                          if key.startswith("emotion")}

    def _step(self, batch: dict[str, Tensor], stage: str, metrics: MetricCollection, keep: bool = False):
        outputs = self._outputs(batch)  # training batches hold no mirrored copy
        loss, parts = self.criterion(outputs, batch["label"], batch["au"], batch["au_mask"])
        batch_size = batch["label"].shape[0]
        trainer = self._trainer  # None when called outside a Trainer (unit tests)
        # DDP: mean over ranks
        on_step, sync = stage == "train", trainer is not None and trainer.world_size > 1
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=sync)
        # The loss terms and the metrics are logged once per epoch (_log_epoch): a self.log call per
        # term and step costs more than a tiny model's step itself (issue 16's profile).
        sums = self._epoch_sums.setdefault(stage, {})
        for name, value in {**parts, "_n": torch.ones(())}.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * batch_size
        metrics.update(outputs["emotion"].detach(), batch["label"])
        return outputs if keep else loss

    def _log_epoch(self, stage: str, metrics: MetricCollection) -> None:
        """The epoch's batch-size-weighted mean of every loss term, and its metrics (then reset)."""
        sums = self._epoch_sums.pop(stage, None)
        if not sums:
            return
        n, sync = sums.pop("_n"), self._trainer is not None and self.trainer.world_size > 1
        for name, total in sums.items():
            self.log(f"{stage}/loss_{name}", total / n, sync_dist=sync)
        self.log_dict(metrics.compute())
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step on a training batch."""
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Inner validation (training subjects held out; never the test subject)."""
        outputs = self._step(batch, "val", self.val_metrics, keep=True)
        self._val_outputs.append({"label": batch["label"], "index": batch["index"],
                                  **{k: outputs[k].detach().float() for k in ("emotion_2d", "emotion_3d")
                                     if k in outputs}})

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        """Per-branch inner-validation scores (``val/uf1_2d``, ``val/uf1_3d``) and, with
        ``late_weight_from=val``, the late-fusion weight chosen on them (``val/late_weight``). Runs
        before the epoch's test-subject predictions are recorded, so they use this weight."""
        self._log_epoch("val", self.val_metrics)
        if not self._val_outputs or (self._trainer is not None and self.trainer.sanity_checking):
            return  # a sanity check's 2 batches must not replace a weight (e.g. one restored on resume)
        cat = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        # every rank must choose the same weight
        if self._trainer is not None and self.trainer.world_size > 1:
            cat = {k: self.all_gather(v).flatten(0, 1) for k, v in cat.items()}
            # The DistributedSampler pads with repeated samples: score each validation sample once.
            _, first = np.unique(cat.pop("index").cpu().numpy(), return_index=True)
            cat = {k: v[torch.as_tensor(first, device=v.device)] for k, v in cat.items()}
        cat.pop("index", None)
        label = cat["label"]
        for key in ("emotion_2d", "emotion_3d"):
            if key in cat:
                self.log(f"val/uf1_{key[-2:]}", _uf1(cat[key].argmax(1), label), batch_size=len(label))
        if self.hparams.late_weight_from != "val" or not {"emotion_2d", "emotion_3d"} <= set(cat):
            return
        best = None
        for w in torch.linspace(0, 1, 11).tolist():
            fused = late_fusion(cat["emotion_2d"], cat["emotion_3d"], w)
            score = (_uf1(fused.argmax(1), label), -F.nll_loss(fused, label).item())
            if best is None or score > best[0]:
                best = (score, w)
        self.net.fusion.late_weight.fill_(best[1])
        self.log("val/late_weight", best[1], batch_size=len(label))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Test-subject metrics for `trainer.test` (per fold: noisy, monitoring only)."""
        self._step(batch, "test", self.test_metrics)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities of the headline prediction and AU probabilities of the heads.

        Returns:
            ``{"probs": (B, C), "au_probs": (B, A), "index": (B,)}``, and for a fused model each
            branch's own ``probs_2d`` and ``probs_3d`` (B, C). AU probabilities average the branches
            that have an AU head; A = 0 when no AU head was trained (:attr:`trains_au`).
        """
        outputs = self._outputs(batch)
        au = [torch.sigmoid(outputs[k].float()) for k in ("au_2d", "au_3d")
              if k in outputs and self.trains_au]
        au_probs = torch.stack(au).mean(0) if au else outputs["emotion"].new_zeros((len(batch["index"]), 0))
        out = {"probs": torch.softmax(outputs["emotion"].float(), dim=1), "au_probs": au_probs,
               "index": batch["index"]}
        if "emotion_fused" in outputs:
            out |= {f"probs_{b}": torch.softmax(outputs[f"emotion_{b}"].float(), dim=1) for b in ("2d", "3d")}
        return out

    def configure_optimizers(self) -> dict:
        """Optimiser and an epoch-count schedule (no metric-driven scheduling)."""
        opt, schedule = optimiser(self.parameters(), self.hparams, self.trainer.max_epochs)
        return {"optimizer": opt} | ({"lr_scheduler": schedule} if schedule is not None else {})


def class_balance(train_set, num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """``n / (C * n_c)`` per class over a training set's labels (0 for a class it lacks)."""
    counts = np.bincount(train_set.labels[train_set.indices], minlength=num_classes).astype(np.float64)
    weight = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weight, dtype=torch.float32, device=device)


def _to_channels_last(net: torch.nn.Module) -> None:
    """4D weights (2D convolutions) channels-last, 5D ones (3D convolutions) channels-last-3d, in
    place (``nn.Module.to(memory_format=...)`` takes one format for both ranks and fails on the other)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    with torch.no_grad():
        for param in net.parameters():
            if param.dim() in formats:
                param.data = param.data.contiguous(memory_format=formats[param.dim()])


def optimiser(params, hp, max_epochs: int | None, *, foreach: bool | None = None):
    """``(optimiser, per-epoch LR schedule or None)`` of a module's hyperparameters ``hp``
    (``optimizer``, ``lr``, ``weight_decay``, ``scheduler``, ``warmup_epochs``, ``schedule_epochs``):
    one definition for the Trainer's fits and the runner's stacked folds (loso/stacked.py, which
    asks for the ``foreach`` kernels: its parameters are many small per-fold tensors)."""
    if hp.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, foreach=foreach)
    else:
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay, foreach=foreach)
    if hp.scheduler == "none":
        return opt, None
    epochs = max(1, hp.schedule_epochs or max_epochs or 1)
    warmup = min(hp.warmup_epochs, epochs - 1)

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(1, epochs - warmup)
        return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


#: The former name of :class:`MERLitModule` (the same class, not a subclass), kept so that configs
#: naming ``famnet_pl.models.module.FAMNetLitModule`` and code calling
#: ``FAMNetLitModule.load_from_checkpoint`` keep working. New code: ``MERLitModule``.
FAMNetLitModule = MERLitModule
