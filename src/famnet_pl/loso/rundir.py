"""Every file name of a LOSO run directory, in one place (nothing else spells them).

Layout::

    runs/<exp>/<dataset>/                   run_dir (plan.py: <runs_dir>/<exp>/<DataModule.run_name>)
      run.json                              the plan: args, options, folds, config hash, git state
      loso_summary.json, confusion.png      pooled over every finished fold (aggregate.py)
      slurm_jobs.txt                        job ids of the last SLURM submission (resubmission guard)
      logs/fold_<kk>.log                    fold-parallel processes; logs/submitit/ (SLURM, Python path)
      fold_<kk>_<subject>/                  one fold (callback.py writes it, runner.py wipes a partial one)
        config.yaml                         the fold's resolved config (train-final --from-run reads it)
        predictions.csv                     headline (last epoch); written LAST: the fold-done marker
        predictions_epochs.csv              every evaluated epoch (validation-selected epoch, oracle)
        val_predictions_epochs.csv          inner-validation subjects, every evaluated epoch
        metrics.json                        fold metadata, checksum of predictions.csv, fold scores
        metrics.csv                         per-epoch training log (Lightning's CSVLogger; stacked.py)
        failed.json                         a fold stopped on a non-finite loss or output
        checkpoints/resume-<hash>.ckpt      epoch-boundary resume point (removed when the fold ends)
        model.ckpt, preprocess.json         with --keep-models: the fold's final model (deploy/bundle.py)
      final/                                famnet-pl train-final: model.ckpt, preprocess.json,
                                            model_card.md, model_card.json (deploy/bundle.py names them)

A fold is finished exactly when its ``predictions.csv`` exists; everything else derives from that.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_JSON = "run.json"
SUMMARY = "loso_summary.json"
CONFUSION = "confusion.png"
JOBS_FILE = "slurm_jobs.txt"
LOGS = "logs"
PREDICTIONS = "predictions.csv"
PREDICTIONS_EPOCHS = "predictions_epochs.csv"
VAL_PREDICTIONS_EPOCHS = "val_predictions_epochs.csv"
METRICS = "metrics.json"
TRAIN_LOG = "metrics.csv"  # CSVLogger's file name, which loso/stacked.py writes too
FOLD_CONFIG = "config.yaml"  # the fold's resolved LightningCLI config (SaveConfigCallback's name)
FAILED = "failed.json"
CHECKPOINTS = "checkpoints"
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's mid-epoch SLURM checkpoints: never resumed from
FINAL = "final"  # train-final's model directory in the run folder


def fold_dir_name(fold: int, subject: str) -> str:
    """``fold_03_casme2-sub05``: zero-padded fold index + namespaced subject."""
    return f"fold_{fold:02d}_{subject.replace('/', '-')}"


def fold_dir(run_dir: str | Path, fold: int, subject: str) -> Path:
    """The folder of fold ``fold`` (testing ``subject``) in ``run_dir``."""
    return Path(run_dir) / fold_dir_name(fold, subject)


def fold_log(run_dir: str | Path, fold: int) -> Path:
    """Log of a fold-parallel process (appended to when the fold resumes)."""
    return Path(run_dir) / LOGS / f"fold_{fold:02d}.log"


def resume_checkpoint(fold_dir: str | Path, config_hash: str | None) -> Path:
    """The fold's resume checkpoint, named by the config fingerprint: a fold never resumes from a
    checkpoint trained under another config."""
    return Path(fold_dir) / CHECKPOINTS / f"resume-{config_hash or 'any'}.ckpt"


def corrupt_checkpoint(run_dir: str | Path, fold_dir: str | Path, checkpoint: Path) -> Path:
    """Where an unreadable resume checkpoint is set aside, beside the fold folders."""
    return Path(run_dir) / f"{Path(fold_dir).name}-{checkpoint.name}.corrupt"


def is_finished(fold_dir: str | Path) -> bool:
    """A fold is done when its predictions file exists (written last, atomically)."""
    return (Path(fold_dir) / PREDICTIONS).is_file()


def finished_folds(run_dir: str | Path) -> list[Path]:
    """Fold directories of a run whose predictions are complete, in fold order."""
    return sorted(p.parent for p in Path(run_dir).glob(f"fold_*/{PREDICTIONS}"))


def failed_folds(run_dir: str | Path) -> list[dict]:
    """Folds that stopped on a non-finite loss or output (``failed.json``; no predictions)."""
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob(f"fold_*/{FAILED}"))]


def read_plan(run_dir: str | Path) -> dict:
    """``run.json`` of a run (empty when there is none, e.g. fold folders copied without it)."""
    path = Path(run_dir) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
