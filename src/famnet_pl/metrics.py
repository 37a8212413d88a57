"""LOSO metrics, recomputed from prediction files (never from logged scalars).

MEGC convention (../shared/notes/evaluation.md): concatenate the test predictions of *all* folds,
then per class count TP, FP, FN, N:

    UF1 = mean_c 2TP_c / (2TP_c + FP_c + FN_c)      UAR = mean_c TP_c / N_c      acc = sum TP / N

A class absent from the pooled targets makes UAR undefined: :func:`pooled_metrics` then averages
over the classes present and says so in ``absent_classes`` (and logs a warning) instead of
silently changing the class set. Per-fold means are reported too, as a secondary, noisier number
(folds are single subjects; most miss classes).

Three numbers, three honesty levels (``format_summary`` prints them side by side):

* ``loso/*`` (headline): the last epoch of a fixed budget. Nothing is selected.
* ``loso_valsel/*``: the epoch chosen on *inner validation* (training subjects held out per fold,
  ``data.val_subjects``), then the test predictions of that epoch pooled. Rule ``global`` (the
  default): for fold k, the epoch whose inner-validation predictions, pooled over all folds but
  leaving out fold k's test subject (which is a validation subject of other folds), score the best
  UF1: in practice one shared epoch, chosen stably on many subjects, and nested so that no test
  label of fold k helps choose fold k's epoch. ``loso_valsel_perfold/*``: each fold's own best
  inner-validation epoch (noisier: an inner fold is one or two subjects). Ties go to the later
  epoch (the longer training, closer to the fixed budget). ``loso_val/*`` are the pooled
  inner-validation scores at the headline epoch.
* ``loso_oracle/*``: for each fold, the epoch with the best *test* score, pooled. That uses the
  test subject for selection, so it is an upper bound for comparison with published numbers that
  did this, never a result.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def pooled_metrics(y_true, y_pred, num_classes: int, *, warn: bool = True) -> dict:
    """UF1, UAR, accuracy, per-class F1/recall and the confusion matrix of pooled predictions.

    Args:
        y_true: true labels of every test sample of every fold.
        y_pred: predicted labels, same order.
        num_classes: size of the protocol's class set.
        warn: log a warning when a class is absent from the targets (off for epoch selection, which
            scores many small subsets).

    Returns:
        ``{"uf1", "uar", "acc", "f1_per_class", "recall_per_class", "confusion", "n",
        "absent_classes"}``.
    """
    cm = confusion(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    fp, fn, support = cm.sum(0) - tp, cm.sum(1) - tp, cm.sum(1)
    present = support > 0
    absent = [int(c) for c in np.flatnonzero(~present)]
    if absent and warn:
        log.warning("classes %s absent from the pooled targets: UF1/UAR averaged over classes %s",
                    absent, np.flatnonzero(present).tolist())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        recall = np.where(present, tp / np.maximum(support, 1), np.nan)
    n = int(cm.sum())
    return {
        "uf1": float(f1[present].mean()) if present.any() else math.nan,
        "uar": float(recall[present].mean()) if present.any() else math.nan,
        "acc": float(tp.sum() / n) if n else math.nan,
        "f1_per_class": [float(v) for v in f1],
        "recall_per_class": [None if math.isnan(v) else float(v) for v in recall],
        "confusion": cm.tolist(),
        "n": n,
        "absent_classes": absent,
    }


def au_f1(frame: pd.DataFrame, au_vocab: list[int], threshold: float = 0.5) -> dict:
    """Per-AU binary F1 over pooled predictions (masked entries ignored) and their mean.

    Expects columns ``au<k>_true``, ``au<k>_prob`` and ``au<k>_mask`` for every AU in ``au_vocab``.
    """
    per_au = {}
    for au in au_vocab:
        mask = frame[f"au{au}_mask"].to_numpy() > 0
        t = frame[f"au{au}_true"].to_numpy()[mask] > 0.5
        p = frame[f"au{au}_prob"].to_numpy()[mask] >= threshold
        tp, fp, fn = np.sum(t & p), np.sum(~t & p), np.sum(t & ~p)
        per_au[f"AU{au}"] = float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else math.nan
    values = [v for v in per_au.values() if not math.isnan(v)]
    return {"per_au": per_au, "mean": float(np.mean(values)) if values else math.nan}


def fold_scores(y_true, y_pred) -> dict:
    """Scores inside one fold: macro over the classes present in targets *or* predictions
    (torchmetrics convention; a predicted-but-absent class counts F1 0 and recall 0). Noisy by
    construction: secondary numbers and the oracle criterion only."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s, recalls = [], []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_true == c) & (y_pred == c))
        f1s.append(2 * tp / (np.sum(y_true == c) + np.sum(y_pred == c)))
        recalls.append(tp / np.sum(y_true == c) if np.sum(y_true == c) else 0.0)
    return {"uf1": float(np.mean(f1s)), "uar": float(np.mean(recalls)),
            "acc": float(np.mean(y_true == y_pred))}


def _per_fold(frame: pd.DataFrame) -> list[dict]:
    # One entry per fold, named by its held-out group (a subject; a dataset for leave-one-dataset-out).
    group = "group" if "group" in frame.columns else "subject"
    return [{"fold": int(fold), "subject": name, "n": len(part),
             **fold_scores(part["y_true"], part["y_pred"])}
            for (fold, name), part in frame.groupby(["fold", group], sort=True)]


def oracle_predictions(epochs: pd.DataFrame, *, by: str = "acc") -> pd.DataFrame:
    """Per fold, the test predictions of the epoch with the best test score (``acc`` or ``uf1``).

    Ties go to the earliest epoch. This is test-subject selection: report it only as an oracle.
    """
    picked = []
    for _, part in epochs.groupby("fold", sort=True):
        scores = [(fold_scores(rows["y_true"], rows["y_pred"])[by], -epoch)
                  for epoch, rows in part.groupby("epoch", sort=True)]
        top = -max(scores)[1]
        picked.append(part[part["epoch"] == top])
    return pd.concat(picked, ignore_index=True)


def best_epoch(scores: dict[int, float]) -> int:
    """The epoch with the highest score; ties go to the later epoch."""
    return max(scores, key=lambda e: (scores[e], e))


def held_out_groups(frame: pd.DataFrame) -> tuple[dict[int, str], str]:
    """``{fold: its held-out group}`` and the column that names a sample's own group: ``subject``
    (LOSO), or ``dataset`` when the held-out groups are datasets (leave-one-dataset-out)."""
    held = {int(f): g for f, g in frame.groupby("fold")["group"].first().items()}
    return held, "subject" if (frame["group"] == frame["subject"]).all() else "dataset"


def select_epochs(val_epochs: pd.DataFrame, num_classes: int, held_out: dict[int, str], column: str) -> dict:
    """Epochs chosen on inner-validation predictions alone (``val_predictions_epochs.csv`` of every
    fold): ``{"global": {fold: e}, "per_fold": {fold: e}, "val_uf1_by_epoch": {e: pooled UF1}}``.

    ``global``: for fold k, the epoch whose validation predictions, pooled over every fold, score the
    best UF1, leaving out the samples of fold k's held-out group (``held_out[k]`` in ``column``).
    Subject k is a training, and so possibly an inner-validation, subject of the other folds: left
    in, its labels would help choose the epoch at which its own test predictions are read. Only the
    epochs every fold evaluated are scored. ``per_fold``: each fold's own validation predictions
    (never its test subject). ``val_uf1_by_epoch``: every validation sample pooled (for reading only)."""
    common = set.intersection(*(set(p["epoch"]) for _, p in val_epochs.groupby("fold")))
    scored = val_epochs[val_epochs["epoch"].isin(common)]

    def by_epoch(rows: pd.DataFrame) -> dict[int, float]:
        return {int(e): pooled_metrics(r["y_true"], r["y_pred"], num_classes, warn=False)["uf1"]
                for e, r in rows.groupby("epoch", sort=True)}

    chosen = {}
    for fold, group in held_out.items():
        scores = by_epoch(scored[scored[column] != group])
        if scores:
            chosen[fold] = best_epoch(scores)
    per_fold = {int(f): best_epoch(by_epoch(part)) for f, part in val_epochs.groupby("fold", sort=True)}
    return {"global": chosen, "per_fold": per_fold, "val_uf1_by_epoch": by_epoch(scored)}


def at_epochs(frame: pd.DataFrame, chosen: dict[int, int]) -> pd.DataFrame:
    """The rows of each fold at its chosen epoch."""
    return frame[frame["epoch"].to_numpy() == frame["fold"].map(chosen).to_numpy()]


def pooled_keys(frame: pd.DataFrame, prefix: str, num_classes: int) -> dict:
    """``<prefix>/uf1``, ``/uar``, ``/acc`` of pooled predictions, and ``<prefix>/<dataset>/uf1``,
    ``/uar`` per dataset when the predictions mix datasets (composites)."""
    m = pooled_metrics(frame["y_true"], frame["y_pred"], num_classes)
    return {f"{prefix}/uf1": m["uf1"], f"{prefix}/uar": m["uar"], f"{prefix}/acc": m["acc"],
            **_per_dataset(frame, prefix, num_classes)}


def _per_dataset(frame: pd.DataFrame, prefix: str, num_classes: int) -> dict:
    """``<prefix>/<dataset>/uf1`` and ``/uar`` when the predictions mix datasets (composites)."""
    out = {}
    if frame["dataset"].nunique() > 1:
        for name, part in frame.groupby("dataset", sort=True):
            d = pooled_metrics(part["y_true"], part["y_pred"], num_classes)
            out[f"{prefix}/{name}/uf1"], out[f"{prefix}/{name}/uar"] = d["uf1"], d["uar"]
    return out


def validation_summary(last: pd.DataFrame, epochs: pd.DataFrame, val_epochs: pd.DataFrame,
                       num_classes: int) -> dict:
    """``loso_val/*`` (inner validation at each fold's headline epoch), the validation-selected
    epochs and the pooled test scores at them (``loso_valsel/*``, ``loso_valsel_perfold/*``)."""
    headline = last.groupby("fold")["epoch"].first().to_dict()
    held_out, column = held_out_groups(last)
    chosen = select_epochs(val_epochs, num_classes, held_out, column)
    summary = {**pooled_keys(at_epochs(val_epochs, headline), "loso_val", num_classes),
               **pooled_keys(at_epochs(epochs, chosen["per_fold"]), "loso_valsel_perfold", num_classes),
               "valsel_epochs_perfold": chosen["per_fold"], "val_uf1_by_epoch": chosen["val_uf1_by_epoch"],
               "val_subjects_per_fold": int(val_epochs.groupby("fold")["subject"].nunique().max())}
    if len(chosen["global"]) == len(headline):  # else the folds share no evaluated epoch
        summary.update({**pooled_keys(at_epochs(epochs, chosen["global"]), "loso_valsel", num_classes),
                        "valsel_epochs": chosen["global"]})
    return summary


def summarize(last: pd.DataFrame, epochs: pd.DataFrame | None, *, class_names: list[str],
              au_vocab: list[int], oracle_by: str = "acc", val_epochs: pd.DataFrame | None = None) -> dict:
    """The LOSO summary: pooled headline metrics, per-dataset and per-fold breakdowns, AU F1,
    and (when per-epoch predictions exist) the oracle-epoch comparison.

    Args:
        last: headline predictions (last epoch of every fold).
        epochs: predictions of every evaluated epoch of every fold, or None.
        class_names: protocol classes in label order.
        au_vocab: AU numbers of the AU columns.
        oracle_by: oracle epoch criterion (``acc``, the common convention, or ``uf1``).
        val_epochs: inner-validation predictions of every evaluated epoch of every fold, or None
            (no inner validation: no ``loso_val*`` keys).

    Returns:
        A JSON-serialisable dict with ``loso/*``, ``loso_perfold/*``, ``loso_oracle/*`` (and, with
        inner validation, ``loso_val/*``, ``loso_valsel/*``, ``loso_valsel_perfold/*``) keys and
        the tables behind them.
    """
    c = len(class_names)
    head = pooled_metrics(last["y_true"], last["y_pred"], c)
    folds = _per_fold(last)
    summary = {
        "loso/uf1": head["uf1"], "loso/uar": head["uar"], "loso/acc": head["acc"],
        "n_samples": head["n"], "n_folds": len(folds), "class_names": list(class_names),
        "confusion": head["confusion"], "f1_per_class": head["f1_per_class"],
        "recall_per_class": head["recall_per_class"], "absent_classes": head["absent_classes"],
        "loso_perfold/uf1_mean": float(np.mean([f["uf1"] for f in folds])),
        "loso_perfold/uf1_std": float(np.std([f["uf1"] for f in folds])),
        "loso_perfold/uar_mean": float(np.mean([f["uar"] for f in folds])),
        "loso_perfold/uar_std": float(np.std([f["uar"] for f in folds])),
        "loso_perfold/acc_mean": float(np.mean([f["acc"] for f in folds])),
        "loso_perfold/acc_std": float(np.std([f["acc"] for f in folds])),
        "per_fold": folds,
    }
    summary.update(_per_dataset(last, "loso", c))
    # AU scores only where an AU head was trained: its probability columns hold numbers.
    au_vocab = [a for a in au_vocab if f"au{a}_prob" in last and last[f"au{a}_prob"].notna().any()]
    if au_vocab:
        au = au_f1(last, au_vocab)
        summary["loso/au_f1"], summary["au_f1_per_au"] = au["mean"], au["per_au"]
    if epochs is not None and len(epochs):
        oracle = oracle_predictions(epochs, by=oracle_by)
        m = pooled_metrics(oracle["y_true"], oracle["y_pred"], c)
        summary.update({
            "loso_oracle/uf1": m["uf1"], "loso_oracle/uar": m["uar"], "loso_oracle/acc": m["acc"],
            "oracle_note": f"oracle epoch: per fold, the epoch with the best test {oracle_by} "
                           "(test-subject selection), for comparison with published numbers only",
            "oracle_epochs": {int(f): int(e) for f, e in
                              oracle.groupby("fold")["epoch"].first().items()},
        })
        if val_epochs is not None and len(val_epochs):
            summary.update(validation_summary(last, epochs, val_epochs, c))
    return summary
