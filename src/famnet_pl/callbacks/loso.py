"""LOSOCallback: per-fold test predictions and pooled LOSO metrics for any Trainer-based run.

Data flow inside one fold (one ``trainer.fit``)::

    every ``eval_every`` epochs and at the last epoch:
        model.eval() on datamodule.test_dataloader() (RNG state forked: the evaluation never changes
        the training trajectory) -> rows (probabilities, AU probabilities, epoch)
    on_fit_end (rank 0):
        fold_dir/predictions_epochs.csv  every evaluated epoch (oracle comparison only)
        fold_dir/metrics.json            fold metadata + last-epoch fold scores
        fold_dir/predictions.csv         last epoch = headline; written LAST: the fold-done marker
        run_dir/loso_summary.json        pooled over every finished fold (aggregate.py); the
                                         running pooled metrics are logged as ``loso/*``

Nothing here selects an epoch: the test subject's predictions are recorded, never used to stop,
checkpoint or schedule. The DataModule must expose ``manifest``, ``test_set``, ``test_subject``,
``class_names``, ``au_vocab``, ``test_dataloader()`` and ``hparams.fold`` (MERDataModule does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from famnet_pl.aggregate import aggregate_run
from famnet_pl.metrics import fold_scores
from famnet_pl.utils.io import atomic_write_csv, atomic_write_json

log = logging.getLogger(__name__)


def fold_dir_name(fold: int, subject: str) -> str:
    """``fold_03_casme2-sub05``: zero-padded fold index + namespaced subject."""
    return f"fold_{fold:02d}_{subject.replace('/', '-')}"


class LOSOCallback(Callback):
    """Write one fold's test predictions and refresh the run's pooled LOSO summary.

    Args:
        run_dir: ``runs/<exp>/<dataset>``; the fold writes into ``run_dir/fold_<kk>_<subject>``.
        n_folds: folds of the protocol (the summary is complete when all have finished).
        eval_every: evaluate the test subject every N epochs for the oracle comparison (0: last
            epoch only).
        oracle_by: oracle criterion, ``acc`` or ``uf1``.
        config_hash: fingerprint of the run's config, stored with the fold so a resumed run never
            mixes folds trained under different configs.
    """

    def __init__(self, run_dir: str, n_folds: int | None = None, eval_every: int = 1,
                 oracle_by: str = "acc", config_hash: str | None = None) -> None:
        super().__init__()
        self.run_dir, self.n_folds, self.config_hash = Path(run_dir), n_folds, config_hash
        self.eval_every, self.oracle_by = eval_every, oracle_by
        self.rows: list[pd.DataFrame] = []
        self.summary: dict | None = None

    def fold_dir(self, trainer: L.Trainer) -> Path:
        """This fold's output folder."""
        dm = trainer.datamodule
        return self.run_dir / fold_dir_name(dm.hparams.fold, dm.test_subject)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = bool(trainer.max_epochs and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs)
        if last or (self.eval_every and (epoch + 1) % self.eval_every == 0):
            self.rows.append(self.predict_test(trainer, pl_module, epoch))

    @torch.no_grad()
    def predict_test(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> pd.DataFrame:
        """Predictions on the test subject at ``epoch`` as a table (one row per sample)."""
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device
        devices = [device] if device.type == "cuda" else []
        probs, au_probs, index = [], [], []
        with torch.random.fork_rng(devices=devices):
            for batch in dm.test_dataloader():
                batch = {k: v.to(device) for k, v in batch.items()}
                out = pl_module.predict_step(batch)
                probs.append(out["probs"].cpu())
                au_probs.append(out["au_probs"].float().cpu())
                index.append(out["index"].cpu())
        pl_module.train(was_training)
        probs, au_probs = torch.cat(probs).numpy(), torch.cat(au_probs).numpy()
        index = torch.cat(index).numpy()
        rows = dm.manifest.iloc[index]
        table = pd.DataFrame({
            "sample_id": rows["sample_id"].to_numpy(), "dataset": rows["dataset"].to_numpy(),
            "subject": rows["subject"].to_numpy(), "fold": dm.hparams.fold, "epoch": epoch,
            "group": dm.test_subject,  # the held-out subject (or dataset, leave-one-dataset-out)
            "y_true": rows["label"].to_numpy(), "y_pred": probs.argmax(1),
        })
        for c, name in enumerate(dm.class_names):
            table[f"prob_{name}"] = probs[:, c]
        test = dm.test_set
        for j, au in enumerate(dm.au_vocab):
            table[f"au{au}_true"] = test.au[index, j]
            table[f"au{au}_prob"] = au_probs[:, j] if au_probs.shape[1] else np.nan
            table[f"au{au}_mask"] = test.au_mask[index, j]
        return table

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not self.rows:
            return
        # A run stopped by max_steps or early stopping may end between evaluations.
        if self.rows[-1]["epoch"].iloc[0] != trainer.current_epoch - 1 and trainer.current_epoch > 0:
            self.rows.append(self.predict_test(trainer, pl_module, trainer.current_epoch - 1))
        if not trainer.is_global_zero:
            return
        dm, out = trainer.datamodule, self.fold_dir(trainer)
        epochs = pd.concat(self.rows, ignore_index=True)
        last = self.rows[-1]
        atomic_write_csv(out / "predictions_epochs.csv", epochs)
        atomic_write_json(out / "metrics.json", {
            "fold": int(dm.hparams.fold), "subject": dm.test_subject, "protocol": dm.protocol.name,
            "class_names": list(dm.class_names), "au_vocab": list(dm.au_vocab),
            "epoch": int(last["epoch"].iloc[0]), "n_test": len(last), "split": dm.split,
            "config_hash": self.config_hash,
            **{f"test/{k}": v for k, v in fold_scores(last["y_true"], last["y_pred"]).items()},
        })
        atomic_write_csv(out / "predictions.csv", last)
        self.summary = aggregate_run(self.run_dir, expected_folds=self.n_folds, oracle_by=self.oracle_by)
        # Pooled metrics are logged once, by the fold that completes the run (earlier partial
        # pools under the same keys would read as final numbers in W&B).
        if self.summary and self.summary.get("complete") and trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in self.summary.items()
                                        if k.startswith("loso") and isinstance(v, float)})
