"""FAMNetLitModule: training logic around a registered network (FAMNet and its branches).

Data flow per step::

    batch {"x2d", "x3d", "label", "au", "au_mask"} -> net(x2d, x3d) -> outputs dict
        -> WeightedMultiTaskLoss -> loss ; outputs["emotion"] -> per-stage torchmetrics

The network comes from the model registry by name (``model: famnet_r18``), with its own options in
``net`` (widths, attention, fusion...; see ``famnet_pl.models.famnet.FAMNet``). ``num_classes``,
``num_aus`` and ``in_channels_2d`` are linked from the DataModule by the CLI, so a config states
them once. Metric objects are separate per stage (correct reduction across processes). Logged
per-stage metrics are for monitoring only: LOSO results are recomputed from prediction files.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from famnet_pl.losses import LossWeights, WeightedMultiTaskLoss
from famnet_pl.models.registry import create_model


def _stage_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection({
        "uf1": MulticlassF1Score(num_classes, average="macro"),
        "uar": MulticlassRecall(num_classes, average="macro"),
        "acc": MulticlassAccuracy(num_classes, average="micro"),
    }, prefix=prefix)


class FAMNetLitModule(L.LightningModule):
    """Multi-task MER training (emotion + AU) for FAMNet-style networks.

    Args:
        model: registry name (``famnet_r18``, ``amnet2d_r18``, ``amnet3d_r18``; the comparison
            models ``frl_dgt`` and ``ststnet``).
        net: extra keyword arguments of the registry factory (widths, attention, fusion, ...).
        num_classes: emotion classes (linked from ``data.num_classes``).
        num_aus: AU vocabulary size (linked from ``data.num_aus``); 0 disables the AU heads.
        in_channels_2d: channels of the 2D view (linked from ``data.in_channels_2d``).
        loss_weights: weights of the multi-task loss terms (losses.py).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        scheduler: ``cosine`` (to 0 over ``trainer.max_epochs``, after ``warmup_epochs`` linear
            warm-up) or ``none``. The schedule depends only on the epoch count, never on a metric.
        warmup_epochs: linear warm-up length.
        pretrain_steps: self-supervised pre-training steps of the model's displacement module
            (FRL-DGT's ``dgm``) on this fold's *training* pairs (never the test subject), before the
            classifier trains; 0: none (trained jointly from the start). With ``net.dgm_mode:
            frozen`` the pre-trained module then stays fixed.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_model(model, num_classes=num_classes, num_aus=num_aus,
                                in_channels_2d=in_channels_2d, **(net or {}))
        self.criterion = WeightedMultiTaskLoss(loss_weights)
        # One metric object per stage: they reduce separately (lightning-hydra-template idiom).
        self.train_metrics = _stage_metrics(num_classes, "train/")
        self.val_metrics = _stage_metrics(num_classes, "val/")
        self.test_metrics = _stage_metrics(num_classes, "test/")

    def on_fit_start(self) -> None:
        """Pre-train the displacement module (``pretrain_steps``); not when resuming from a
        checkpoint, which holds the weights already."""
        steps = self.hparams.pretrain_steps
        if not steps or self.trainer.ckpt_path is not None:
            return
        from famnet_pl.models.components.frl_dgt import pretrain_displacement

        dgm = getattr(self.net, "dgm", None)
        if dgm is None:
            raise ValueError(f"model.pretrain_steps={steps} needs a model with a displacement module (frl_dgt); "
                             f"{self.hparams.model} has none")
        train = self.trainer.datamodule.train_set
        augment, train.augment = train.augment, None  # the pairs as they are: no augmentation draws
        try:
            x = torch.stack([train[j]["x2d"] for j in range(len(train))]).to(self.device)
        finally:
            train.augment = augment
        frozen = not any(p.requires_grad for p in dgm.parameters())
        dgm.requires_grad_(True)
        options = getattr(self.net, "loss_options", {})
        self.pretrain_history = pretrain_displacement(
            dgm, x[:, 0:3], x[:, 3:6], flow=x[:, 6:8] if x.shape[1] >= 8 else None, steps=steps,
            seed=self.trainer.datamodule.hparams.fold, **options)
        dgm.requires_grad_(not frozen)

    def forward(self, x2d: Tensor | None = None, x3d: Tensor | None = None) -> dict[str, Tensor]:
        """Network outputs (see FAMNet.forward)."""
        return self.net(x2d=x2d, x3d=x3d)

    def _step(self, batch: dict[str, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        outputs = self(batch["x2d"], batch.get("x3d"))
        loss, parts = self.criterion(outputs, batch["label"], batch["au"], batch["au_mask"])
        batch_size = batch["label"].shape[0]
        trainer = self._trainer  # None when called outside a Trainer (unit tests)
        on_step, sync = stage == "train", trainer is not None and trainer.world_size > 1  # DDP: mean over ranks
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=sync)
        for name, value in parts.items():
            self.log(f"{stage}/loss_{name}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=sync)
        metrics.update(outputs["emotion"].detach(), batch["label"])
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step on a training batch."""
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Inner validation (training subjects held out; never the test subject)."""
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Test-subject metrics for `trainer.test` (per fold: noisy, monitoring only)."""
        self._step(batch, "test", self.test_metrics)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities of the headline prediction and AU probabilities of the heads.

        Returns:
            ``{"probs": (B, C), "au_probs": (B, A), "index": (B,)}``. AU probabilities average the
            branches that have an AU head.
        """
        outputs = self(batch["x2d"], batch.get("x3d"))
        au = [torch.sigmoid(outputs[k]) for k in ("au_2d", "au_3d") if k in outputs]
        au_probs = torch.stack(au).mean(0) if au else outputs["emotion"].new_zeros((len(batch["label"]), 0))
        return {"probs": torch.softmax(outputs["emotion"].float(), dim=1), "au_probs": au_probs,
                "index": batch["index"]}

    def configure_optimizers(self) -> dict:
        """Optimiser and an epoch-count schedule (no metric-driven scheduling)."""
        hp = self.hparams
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return {"optimizer": opt}
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(hp.warmup_epochs, epochs - 1)

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}
