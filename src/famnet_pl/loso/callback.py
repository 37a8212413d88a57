"""LOSOCallback: per-fold test predictions and pooled LOSO metrics for any Trainer-based run.

Data flow inside one fold (one ``trainer.fit``)::

    every ``eval_every`` epochs and at the last epoch:
        model.eval() on datamodule.test_dataloader() and, with inner validation, val_dataloader()
        (RNG state forked: the evaluation never changes the training trajectory)
        -> rows (probabilities, AU probabilities, epoch), val_rows
    on_fit_end (rank 0):
        fold_dir/predictions_epochs.csv  every evaluated epoch (validation-selected epoch, oracle)
        fold_dir/val_predictions_epochs.csv  inner-validation subjects, every evaluated epoch:
                                         what epoch selection reads (aggregate.py)
        fold_dir/metrics.json            fold metadata + last-epoch fold scores
        fold_dir/predictions.csv         last epoch = headline; written LAST: the fold-done marker
        run_dir/loso_summary.json        pooled over every finished fold (aggregate.py; run_dir is
                                         fold_dir's parent); logged as ``loso/*`` once complete

Nothing here selects an epoch: the test subject's predictions are recorded, never used to stop,
checkpoint or schedule; the selection on inner validation happens after the run, in aggregation.
The fold's folder and index come from the runner (run_fold), which named them; the DataModule
must expose ``manifest``, ``test_set``, ``val_set``, ``test_subject``, ``class_names``, ``au_vocab``,
``protocol``, ``split``, ``dropped()``, ``test_dataloader()`` and ``val_dataloader()`` (MERDataModule
does).
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from famnet_pl.deploy.bundle import write_bundle
from famnet_pl.loso.aggregate import aggregate_run
from famnet_pl.loso.rundir import (
    CHECKPOINTS,
    HPC_CHECKPOINTS,
    METRICS,
    PREDICTIONS,
    PREDICTIONS_EPOCHS,
    VAL_PREDICTIONS_EPOCHS,
    resume_checkpoint,
)
from famnet_pl.metrics import fold_scores
from famnet_pl.utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, csv_bytes

log = logging.getLogger(__name__)


#: predict_step's per-branch outputs of a fused model, after the headline ``probs``.
PROB_KEYS = ("probs", "probs_2d", "probs_3d")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or output: the fold stops and is marked failed."""


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0)


def gather_shards(probs: np.ndarray, au_probs: np.ndarray, index: np.ndarray, *, expected: int):
    """All ranks' test-prediction shards, in manifest order, each sample exactly once.

    The shards come from a non-padding split (``test_dataloader(shard=...)``), so nothing is
    repeated; a missing or repeated sample is an error rather than a silently wrong count (a
    DistributedSampler would pad a 5-sample test subject to 6 on 2 ranks, 8 on 4).
    """
    shards: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, (probs, au_probs, index))
    shards = [s for s in shards if len(s[2])]  # a rank may get no sample (fewer samples than ranks)
    index = np.concatenate([s[2] for s in shards])
    if len(index) != expected or len(np.unique(index)) != expected:
        raise RuntimeError(f"gathered {len(index)} test predictions ({len(np.unique(index))} distinct) for a "
                           f"test set of {expected}: the shards overlap or miss samples")
    order = np.argsort(index, kind="stable")
    return (np.concatenate([s[0] for s in shards])[order], np.concatenate([s[1] for s in shards])[order],
            index[order])


class LOSOCallback(Callback):
    """Write one fold's test predictions and refresh the run's pooled LOSO summary.

    Args:
        fold_dir: this fold's folder, ``runs/<exp>/<dataset>/fold_<kk>_<subject>`` (rundir.py); the
            run's pooled summary goes to its parent.
        fold: this fold's index in the run's plan.
        n_folds: folds of the protocol (the summary is complete when all have finished).
        eval_every: evaluate the inner-validation subjects and the test subject every N epochs
            (0: last epoch only): the epochs validation selection can choose, and the oracle.
        oracle_by: oracle criterion, ``acc`` or ``uf1``.
        config_hash: fingerprint of the run's config, stored with the fold so a resumed run never
            mixes folds trained under different configs.
        resume_every: save the fold's resume checkpoint (``checkpoints/resume-<hash>.ckpt``: weights,
            optimiser, loops, recorded predictions, random streams) every N epochs; 0: never.
            A killed or requeued fold continues from it and ends exactly as an uninterrupted one.
        keep_model: write the fold's final model as a model directory (deploy/bundle.py:
            ``model.ckpt`` + ``preprocess.json``) in ``fold_dir``, before ``predictions.csv``.
    """

    def __init__(self, fold_dir: str | Path, fold: int, n_folds: int | None = None, eval_every: int = 1,
                 oracle_by: str = "acc", config_hash: str | None = None, resume_every: int = 1,
                 keep_model: bool = False) -> None:
        super().__init__()
        self.keep_model = keep_model
        self.fold_dir, self.fold = Path(fold_dir), fold
        self.n_folds, self.config_hash = n_folds, config_hash
        self.eval_every, self.oracle_by, self.resume_every = eval_every, oracle_by, resume_every
        self.rows: list[pd.DataFrame] = []
        self.val_rows: list[pd.DataFrame] = []
        self.summary: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Here, not in on_fit_start: a resume checkpoint restores ``rows`` between the two.
        self.rows, self.val_rows = [], []

    def _non_finite(self, trainer: L.Trainer, what: str) -> NonFiniteError:
        dm = trainer.datamodule
        return NonFiniteError(
            f"fold {self.fold} ({dm.test_subject}): non-finite {what} (NaN or inf) at epoch "
            f"{trainer.current_epoch}, step {trainer.global_step}; the fold is stopped and gets no "
            "predictions: lower the learning rate (--model.lr), train in 32-bit precision "
            "(--trainer.precision=32) or clip gradients (--trainer.gradient_clip_val=1.0)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # At the first bad step: a NaN trained through turns into NaN probabilities, argmax 0 for
        # every sample and a plausible-looking (chance-level) score.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise self._non_finite(trainer, "training loss")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = bool(trainer.max_epochs and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs)
        if last or (self.eval_every and (epoch + 1) % self.eval_every == 0):
            self._evaluate(trainer, pl_module, epoch)
        if self.resume_every and not last and (epoch + 1) % self.resume_every == 0:
            # Every rank calls it (collective under DDP); rank 0 writes, atomically.
            trainer.save_checkpoint(resume_checkpoint(self.fold_dir, self.config_hash))

    def state_dict(self) -> dict:
        """What a resumed fold needs besides weights, optimiser and loops: the test and validation
        predictions recorded so far and the global random streams (python, numpy, torch, CUDA)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"rows": [r.to_dict(orient="list") for r in self.rows],
                "val_rows": [r.to_dict(orient="list") for r in self.val_rows],
                "config_hash": self.config_hash,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": cuda}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.rows = [pd.DataFrame(r) for r in state_dict["rows"]]
        self.val_rows = [pd.DataFrame(r) for r in state_dict.get("val_rows", [])]
        rng = state_dict["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        self.rows.append(self.predict(trainer, pl_module, epoch, "test"))
        if getattr(trainer.datamodule, "val_set", None) is not None:
            self.val_rows.append(self.predict(trainer, pl_module, epoch, "val"))

    def predict_test(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> pd.DataFrame:
        """Predictions on the test subject at ``epoch`` as a table (one row per sample)."""
        return self.predict(trainer, pl_module, epoch, "test")

    @torch.no_grad()
    def predict(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                split: str = "test") -> pd.DataFrame:
        """Predictions on the ``test`` subject or the inner-``val`` subjects at ``epoch`` as a table
        (one row per sample; ``group`` is the fold's held-out subject either way)."""
        dm = trainer.datamodule
        dataset, loader_of = ((dm.test_set, dm.test_dataloader) if split == "test"
                              else (dm.val_set, dm.val_dataloader))
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device
        devices = [device] if device.type == "cuda" else []
        world = trainer.world_size
        if world > 1:
            # DDP keeps weights equal across ranks, but each rank's last step updated its own
            # BatchNorm statistics: use rank 0's everywhere, as a single-device eval would.
            for buffer in pl_module.buffers():
                torch.distributed.broadcast(buffer, src=0)
        probs, au_probs, index = [], [], []
        with torch.random.fork_rng(devices=devices):
            shard = {"shard": (trainer.global_rank, world)} if world > 1 else {}
            loader = loader_of(**shard)
            for batch in loader:
                batch = dm.on_after_batch_transfer({k: v.to(device) for k, v in batch.items()}, 0)
                out = pl_module.predict_step(batch)
                # a fused model's branches too (prediction_table: prob2d_*, prob3d_*), carried as
                # extra columns of the probabilities through the DDP gather
                probs.append(torch.cat([out[k].float().cpu() for k in PROB_KEYS if k in out], 1))
                au_probs.append(out["au_probs"].float().cpu())
                index.append(out["index"].cpu())
        pl_module.train(was_training)
        probs, au_probs = _cat(probs).numpy(), _cat(au_probs).numpy()
        index = _cat(index).numpy()
        if not (np.isfinite(probs).all() and np.isfinite(au_probs).all()):
            raise self._non_finite(trainer, "test-subject output" if split == "test"
                                   else "inner-validation output")
        if world > 1:
            probs, au_probs, index = gather_shards(probs, au_probs, index, expected=len(dataset))
        n = len(dm.class_names)
        branches = {b: probs[:, n * (j + 1):n * (j + 2)] for j, b in enumerate(("2d", "3d"))
                    if probs.shape[1] > n * (j + 1)}
        return prediction_table(dm, dataset, self.fold, epoch, probs[:, :n], au_probs, index, branches)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped by max_steps or early stopping may end between evaluations. Here, not in
        # on_fit_end: the strategy is torn down (model on CPU, process group gone) by then.
        if trainer.interrupted or not self.rows:
            return
        if self.rows[-1]["epoch"].iloc[0] != trainer.current_epoch - 1 and trainer.current_epoch > 0:
            self._evaluate(trainer, pl_module, trainer.current_epoch - 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not self.rows:
            return
        if not trainer.is_global_zero:
            return
        dm, out = trainer.datamodule, self.fold_dir
        predictions = write_fold_records(out, dm, self.fold, self.rows, self.val_rows,
                                         config_hash=self.config_hash, world_size=trainer.world_size)
        if self.keep_model:  # before the fold-done marker: a finished fold with the option has its model
            write_bundle(out, pl_module, dm)
        atomic_write_bytes(out / PREDICTIONS, predictions)
        # The fold is done: its resume points (ours, and Lightning's SLURM ones) are dead weight, and
        # so is a checkpoint a killed first part of the fold saved (this run's ModelCheckpoint does
        # not know it).
        saved = trainer.checkpoint_callback
        keep = {str(Path(p)) for p in (saved.best_model_path, saved.last_model_path) if p} if saved else set()
        for stale in [*out.glob(f"{CHECKPOINTS}/*.ckpt"), *out.glob(HPC_CHECKPOINTS)]:
            if str(stale) not in keep:
                stale.unlink(missing_ok=True)
        self.summary = aggregate_run(self.fold_dir.parent, expected_folds=self.n_folds,
                                     oracle_by=self.oracle_by)
        # Pooled metrics are logged once, by the fold that completes the run (earlier partial
        # pools under the same keys would read as final numbers in W&B).
        if self.summary and self.summary.get("complete") and trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in self.summary.items()
                                        if k.startswith("loso") and isinstance(v, float)})


def prediction_table(dm, dataset, fold: int, epoch: int, probs: np.ndarray, au_probs: np.ndarray,
                     index: np.ndarray, branches: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One evaluation's predictions as a table, one row per sample (manifest rows ``index``) of
    ``dataset`` (its AU targets and masks); ``group`` is the fold's held-out subject. ``branches``: a
    fused model's per-branch probabilities (``{"2d": (N, C), "3d": (N, C)}``) as ``prob2d_<class>`` /
    ``prob3d_<class>`` columns: each branch's own score, and what a fusion rule can be studied on
    (the headline reads ``prob_<class>`` only)."""
    rows = dm.manifest.iloc[index]
    table = pd.DataFrame({
        "sample_id": rows["sample_id"].to_numpy(), "dataset": rows["dataset"].to_numpy(),
        "subject": rows["subject"].to_numpy(), "fold": fold, "epoch": epoch,
        "group": dm.test_subject,  # the held-out subject (or dataset, leave-one-dataset-out)
        "y_true": rows["label"].to_numpy(), "y_pred": probs.argmax(1),
    })
    for c, name in enumerate(dm.class_names):
        table[f"prob_{name}"] = probs[:, c]
    for branch, branch_probs in (branches or {}).items():
        for c, name in enumerate(dm.class_names):
            table[f"prob{branch}_{name}"] = branch_probs[:, c]
    for j, au in enumerate(dm.au_vocab):
        table[f"au{au}_true"] = dataset.au[index, j]
        table[f"au{au}_prob"] = au_probs[:, j] if au_probs.shape[1] else np.nan
        table[f"au{au}_mask"] = dataset.au_mask[index, j]
    return table


def write_fold_records(out: Path, dm, fold: int, rows: list[pd.DataFrame], val_rows: list[pd.DataFrame], *,
                       config_hash: str | None, world_size: int = 1) -> bytes:
    """Write a fold's evaluation records (``predictions_epochs.csv``, ``val_predictions_epochs.csv``,
    ``metrics.json``) and return the bytes of its ``predictions.csv`` (the last evaluation), which
    the caller writes last: the fold-done marker. ``dm`` is set up for this fold."""
    epochs = pd.concat(rows, ignore_index=True)
    last = rows[-1]
    atomic_write_csv(out / PREDICTIONS_EPOCHS, epochs)
    validation = {}
    if val_rows:
        val_bytes = csv_bytes(pd.concat(val_rows, ignore_index=True))
        atomic_write_bytes(out / VAL_PREDICTIONS_EPOCHS, val_bytes)
        validation = {"val_predictions_sha256": hashlib.sha256(val_bytes).hexdigest()}
    predictions = csv_bytes(last)
    # What aggregation checks the prediction file against: its bytes, its samples (the test
    # subject's, each once), so an edited, truncated or duplicated file is an error, not a score.
    atomic_write_json(out / METRICS, {
        "fold": int(fold), "subject": dm.test_subject, "protocol": dm.protocol.name,
        "class_names": list(dm.class_names), "au_vocab": list(dm.au_vocab),
        "epoch": int(last["epoch"].iloc[0]), "n_test": len(last), "split": dm.split,
        "config_hash": config_hash, "world_size": world_size,
        "sample_ids": last["sample_id"].tolist(),
        "predictions_sha256": hashlib.sha256(predictions).hexdigest(), **validation,
        "dropped": dm.dropped(),
        **{f"test/{k}": v for k, v in fold_scores(last["y_true"], last["y_pred"]).items()},
    })
    return predictions
