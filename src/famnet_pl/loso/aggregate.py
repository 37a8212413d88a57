"""Fold prediction files -> ``loso_summary.json``, confusion-matrix PNG and the printed table.

Data flow::

    <run>/fold_*/predictions.csv        (headline: last epoch)   --+
    <run>/fold_*/predictions_epochs.csv (every evaluated epoch)  --+--> metrics.summarize
    <run>/fold_*/metrics.json           (classes, AU vocabulary) --+        |
                                                                            v
                              <run>/loso_summary.json, <run>/confusion.png, printed table

A fold counts as finished when its ``predictions.csv`` exists (it is written last, atomically).
The summary depends only on those files, so an interrupted-and-resumed run and an uninterrupted
run with the same seed give the same ``loso_summary.json``. :func:`print_summary` is the one place
the table is printed (local runs, fold-parallel runs, SLURM jobs, ``famnet-pl aggregate``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from famnet_pl.loso.rundir import (
    CONFUSION,
    METRICS,
    PREDICTIONS,
    PREDICTIONS_EPOCHS,
    SUMMARY,
    VAL_PREDICTIONS_EPOCHS,
    failed_folds,
    finished_folds,
    read_plan,
)
from famnet_pl.metrics import held_out_groups, select_epochs, summarize
from famnet_pl.utils.io import atomic_write_bytes, atomic_write_json, sha256_file


@dataclass
class RunPredictions:
    """The prediction files of a run's finished folds, checked and concatenated."""

    metas: list[dict]            # each fold's metrics.json
    last: pd.DataFrame           # headline (last-epoch) test predictions
    epochs: pd.DataFrame | None  # test predictions of every evaluated epoch
    val_epochs: pd.DataFrame | None  # inner-validation predictions of every evaluated epoch

    def selected_epochs(self) -> dict[int, int] | None:
        """Each fold's validation-selected epoch (rule ``global``, metrics.select_epochs), or None
        without inner validation or a common evaluated epoch."""
        if self.val_epochs is None:
            return None
        held_out, column = held_out_groups(self.last)
        chosen = select_epochs(self.val_epochs, len(self.metas[0]["class_names"]), held_out, column)["global"]
        return chosen if len(chosen) == len(held_out) else None

    def summarize(self, oracle_by: str = "acc") -> dict:
        """The pooled summary of these predictions (metrics.summarize)."""
        meta = self.metas[0]
        return summarize(self.last, self.epochs, class_names=meta["class_names"], au_vocab=meta["au_vocab"],
                         oracle_by=oracle_by, val_epochs=self.val_epochs)


def load_predictions(run_dir: str | Path) -> RunPredictions | None:
    """Every finished fold's prediction files of ``run_dir``, checked against what each fold recorded
    (PredictionsError otherwise); None when no fold has finished."""
    run_dir = Path(run_dir)
    folds = finished_folds(run_dir)
    if not folds:
        return None
    metas = [json.loads((f / METRICS).read_text()) for f in folds]
    meta = metas[0]
    for other, f in zip(metas, folds):
        if (other["class_names"], other["au_vocab"]) != (meta["class_names"], meta["au_vocab"]):
            raise ValueError(f"{f}: classes or AU vocabulary differ from {folds[0]}; folds of one run "
                             "must share them (delete the stray fold or use another run directory)")
    plan = read_plan(run_dir).get("folds", {})
    last = pd.concat([_checked_predictions(f, m, plan) for f, m in zip(folds, metas)], ignore_index=True)
    epoch_files = [f / PREDICTIONS_EPOCHS for f in folds if (f / PREDICTIONS_EPOCHS).is_file()]
    epochs = pd.concat([pd.read_csv(f) for f in epoch_files], ignore_index=True) if epoch_files else None
    val = [_checked_validation(f, m) for f, m in zip(folds, metas) if "val_predictions_sha256" in m]
    # Epoch selection needs every fold's validation predictions: a run mixing folds with and
    # without inner validation has none to select on.
    val_epochs = pd.concat(val, ignore_index=True) if val and len(val) == len(folds) else None
    return RunPredictions(metas=metas, last=last, epochs=epochs, val_epochs=val_epochs)


def aggregate_run(run_dir: str | Path, *, expected_folds: int | None = None, oracle_by: str = "acc",
                  write: bool = True) -> dict | None:
    """Pool the finished folds of a run.

    Args:
        run_dir: ``runs/<exp>/<dataset>``.
        expected_folds: folds the protocol has; the summary lists the missing ones and is marked
            ``complete`` only when all are there.
        oracle_by: oracle epoch criterion.
        write: write ``loso_summary.json`` and ``confusion.png`` into ``run_dir``.

    Returns:
        The summary dict, or None when no fold has finished.
    """
    run_dir = Path(run_dir)
    predictions = load_predictions(run_dir)
    if predictions is None:
        return None
    metas = predictions.metas
    summary = predictions.summarize(oracle_by)
    done = sorted(int(m["fold"]) for m in metas)
    failed = {str(f["fold"]): f["error"] for f in failed_folds(run_dir)}
    summary.update({"protocol": metas[0]["protocol"], "folds_done": done,
                    "complete": (expected_folds is None or len(done) == expected_folds) and not failed})
    if failed:
        summary["folds_failed"] = failed
    dropped = {d["sample_id"]: d for m in metas for d in m.get("dropped", [])}
    summary["dropped"] = [dropped[k] for k in sorted(dropped)]
    if expected_folds is not None:
        summary["folds_missing"] = sorted(set(range(expected_folds)) - set(done))
    if write:
        write_summary(run_dir, summary)
    return summary


def write_summary(out_dir: str | Path, summary: dict) -> None:
    """``loso_summary.json`` and ``confusion.png`` of ``summary`` into ``out_dir`` (atomically)."""
    atomic_write_json(Path(out_dir) / SUMMARY, _finite(summary))
    atomic_write_bytes(Path(out_dir) / CONFUSION, confusion_png(summary))


class PredictionsError(ValueError):
    """A fold's prediction file does not match what the fold recorded when it finished."""


def _checked_predictions(fold_dir: Path, meta: dict, plan: dict) -> pd.DataFrame:
    """A fold's ``predictions.csv``, checked against its ``metrics.json`` (checksum, sample ids, count)
    and the run's plan (``run.json``: which subject fold k tests); every probability finite."""
    path = fold_dir / PREDICTIONS

    def bad(what: str) -> PredictionsError:
        return PredictionsError(f"{path}: {what}; the file was changed after the fold finished: restore it, "
                                f"or delete {fold_dir} and rerun the fold (FOLDS={meta['fold']})")

    if "predictions_sha256" in meta and sha256_file(path) != meta["predictions_sha256"]:
        raise bad("checksum differs from the one recorded in metrics.json")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise bad(f"unreadable CSV ({type(exc).__name__})") from None
    ids = frame["sample_id"].astype(str) if "sample_id" in frame else pd.Series(dtype=str)
    if ids.duplicated().any():
        raise bad(f"sample {ids[ids.duplicated()].iloc[0]} appears twice")
    recorded = sorted(map(str, meta["sample_ids"])) if "sample_ids" in meta else sorted(ids)
    if len(frame) != meta["n_test"] or sorted(ids) != recorded:
        raise bad(f"{len(frame)} samples, but the fold predicted {meta['n_test']}")
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]]
    if probs.shape[1] != len(meta["class_names"]) or not np.isfinite(probs.to_numpy(dtype=float)).all():
        raise bad("missing or non-finite class probabilities")
    planned = plan.get(str(meta["fold"]))
    if planned is not None and planned != meta["subject"]:
        raise bad(f"fold {meta['fold']} tests {meta['subject']}, but run.json plans it for {planned}")
    return frame


def _checked_validation(fold_dir: Path, meta: dict) -> pd.DataFrame:
    """A fold's inner-validation predictions, checked against the checksum in its ``metrics.json``."""
    path = fold_dir / VAL_PREDICTIONS_EPOCHS
    if not path.is_file() or sha256_file(path) != meta["val_predictions_sha256"]:
        what = ("missing, though metrics.json records its checksum" if not path.is_file()
                else "checksum differs from the one recorded in metrics.json")
        raise PredictionsError(f"{path}: {what}; restore it, or delete {fold_dir} and rerun the fold "
                               f"(FOLDS={meta['fold']})")
    return pd.read_csv(path)


def _finite(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def confusion_png(summary: dict) -> bytes:
    """The pooled confusion matrix as PNG bytes (rows true, columns predicted)."""
    from famnet_pl.utils.plot import figure_png, pyplot

    names = summary["class_names"]
    fig, ax = pyplot().subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    draw_confusion(ax, names, summary["confusion"], f"LOSO pooled, {summary['protocol']}: UF1 "
                   f"{summary['loso/uf1']:.3f}, UAR {summary['loso/uar']:.3f}")
    return figure_png(fig, dpi=110)


def draw_confusion(ax, names: list[str], cm: list[list[int]], title: str, **text) -> None:
    """A confusion matrix on ``ax`` (rows true, columns predicted, counts written in the cells);
    ``text``: font options of the labels and counts (e.g. ``fontsize=7`` in a grid of panels)."""
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", **text)
    ax.set_yticks(range(len(names)), names, **text)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black",
                    **text)
    ax.set_title(title, fontsize=9)


def summarize_run(run_dir: str | Path) -> dict | None:
    """The pooled summary of a run's prediction files, with the oracle criterion it ran under (no
    files written); None when no fold has finished."""
    predictions = load_predictions(run_dir)
    return None if predictions is None else predictions.summarize(read_plan(run_dir).get("oracle_by", "acc"))


def epoch_range(epochs: dict) -> str:
    """``epoch 15`` or ``epochs 14-16``: the 0-based epochs chosen for the folds."""
    low, high = min(epochs.values()), max(epochs.values())
    return f"epoch {low}" if low == high else f"epochs {low}-{high}"


def format_summary(summary: dict) -> str:
    """The printed LOSO result table."""
    names = summary["class_names"]
    def row(label: str, prefix: str) -> str:
        return (f"{label:38s}{summary[prefix + '/uf1']:8.3f}{summary[prefix + '/uar']:8.3f}"
                f"{summary[prefix + '/acc']:8.3f}")

    lines = [
        f"LOSO {summary['protocol']}: {summary['n_samples']} samples, {summary['n_folds']} folds"
        + ("" if summary.get("complete", True)
           else f" (INCOMPLETE: missing folds {summary['folds_missing']})"),
        "",
        f"{'':38s}{'UF1':>8s}{'UAR':>8s}{'acc':>8s}",
        row("pooled, last epoch (headline)", "loso"),
    ]
    if "loso_valsel/uf1" in summary:
        lines.append(row(f"pooled, val-selected ({epoch_range(summary['valsel_epochs'])})", "loso_valsel"))
    if "loso_val/uf1" in summary:
        lines += [row("pooled, val-selected epoch per fold", "loso_valsel_perfold"),
                  row("inner validation, last epoch (not test)", "loso_val")]
    if "loso_oracle/uf1" in summary:
        lines.append(row("pooled, ORACLE epoch (not a result)", "loso_oracle"))
    lines.append(
        f"{'per-fold mean +/- std (secondary)':38s}"
        f"{summary['loso_perfold/uf1_mean']:5.3f}+/-{summary['loso_perfold/uf1_std']:.2f} "
        f"{summary['loso_perfold/uar_mean']:5.3f}+/-{summary['loso_perfold/uar_std']:.2f}")
    for key in sorted(k for k in summary if k.count("/") == 2 and k.startswith("loso/")):
        lines.append(f"  {key:36s}{summary[key]:8.3f}")
    if "oracle_note" in summary:
        lines.append(f"  note: {summary['oracle_note']}")
    width = max(len(n) for n in names) + 2
    lines += ["", "confusion (rows true, cols predicted):",
              " " * width + "".join(f"{n[:8]:>9s}" for n in names) + "   recall"]
    for name, row, rec in zip(names, summary["confusion"], summary["recall_per_class"]):
        lines.append(f"{name:{width}s}" + "".join(f"{v:9d}" for v in row)
                     + ("      n/a" if rec is None else f"{rec:9.3f}"))
    for fold, error in summary.get("folds_failed", {}).items():
        lines.append(f"  FAILED fold {fold}: {error}")
    for c in summary.get("absent_classes", []):
        lines.append(f"  WARNING: class {names[c]} has no sample in the pooled test predictions "
                     "(UF1/UAR average the other classes)")
    if summary.get("dropped"):
        lines.append(f"  {len(summary['dropped'])} samples left out at preprocessing (in no fold's training "
                     "or test set; restore their frames or drop them with --data.drop):")
        lines += [f"    {d['sample_id']} ({d['subject']}): {d['error']}" for d in summary["dropped"]]
    if "au_f1_per_au" in summary:
        au = "  ".join(f"{k} {'n/a' if v is None or v != v else f'{v:.2f}'}"
                       for k, v in summary["au_f1_per_au"].items())
        lines += ["", f"AU F1 (mean {summary['loso/au_f1']:.3f}): {au}"]
    return "\n".join(lines)


def print_summary(summary: dict | None, run_dir: str | Path, *, files: bool = True) -> None:
    """Print the table of ``summary`` (and, with ``files``, where the summary and the confusion
    matrix are); a run without a finished fold says so on stderr."""
    run_dir = Path(run_dir)
    if summary is None:
        print(f"{run_dir}: no finished fold (no fold_*/{PREDICTIONS})", file=sys.stderr, flush=True)
        return
    print("\n" + format_summary(summary), flush=True)
    if files:
        print(f"\nsummary: {run_dir / SUMMARY}; confusion matrix: {run_dir / CONFUSION}", flush=True)
