"""Pooled LOSO metrics against sklearn, per-fold vs pooled, absent classes, oracle epochs."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from famnet_pl.metrics import fold_scores, oracle_predictions, pooled_metrics, summarize


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_pooled_equals_sklearn_on_random_predictions(num_classes, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(num_classes, 120))
    y_true = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    y_pred = rng.integers(0, num_classes, n)
    m = pooled_metrics(y_true, y_pred, num_classes)
    labels = list(range(num_classes))
    assert m["uf1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=labels,
                                              zero_division=0))
    assert m["uar"] == pytest.approx(recall_score(y_true, y_pred, average="macro", labels=labels))
    assert m["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(m["confusion"], confusion_matrix(y_true, y_pred, labels=labels))


def test_per_fold_mean_differs_from_pooled():
    # fold A: 2 samples both right (class 0); fold B: 4 samples, class 1 right once of 4.
    y_true = np.array([0, 0, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 0, 0, 0])
    pooled = pooled_metrics(y_true, y_pred, 2)
    per_fold = np.mean([fold_scores(y_true[:2], y_pred[:2])["uar"],
                        fold_scores(y_true[2:], y_pred[2:])["uar"]])
    assert pooled["uar"] == pytest.approx((1.0 + 0.25) / 2)
    assert per_fold != pytest.approx(pooled["uar"])


def test_absent_class_is_reported_not_hidden(caplog):
    m = pooled_metrics([0, 0, 1, 1], [0, 0, 1, 2], 3)
    assert m["absent_classes"] == [2]
    assert m["uar"] == pytest.approx(0.75)   # over present classes 0 and 1, and said so
    assert "absent" in caplog.text
    # torchmetrics-style per-fold score counts the predicted-but-absent class: 0.5
    assert fold_scores([0, 0, 1, 1], [0, 0, 1, 2])["uar"] == pytest.approx(0.5)


def _epochs_frame():
    rows = []
    for fold, (subject, truth) in enumerate([("s/a", [0, 1]), ("s/b", [1, 1])]):
        for epoch, preds in enumerate([[1, 0], [0, 1], [0, 0]] if fold == 0 else [[1, 1], [0, 0], [1, 0]]):
            for i, (t, p) in enumerate(zip(truth, preds)):
                rows.append({"sample_id": f"{subject}/{i}", "dataset": "s", "subject": subject, "fold": fold,
                             "epoch": epoch, "y_true": t, "y_pred": p})
    return pd.DataFrame(rows)


def test_oracle_picks_best_test_epoch_per_fold_and_headline_is_last():
    epochs = _epochs_frame()
    oracle = oracle_predictions(epochs)
    assert oracle.groupby("fold")["epoch"].first().to_dict() == {0: 1, 1: 0}
    last = epochs[epochs["epoch"] == 2]
    s = summarize(last, epochs, class_names=["a", "b"], au_vocab=[])
    assert s["loso/acc"] == pytest.approx(2 / 4)
    assert s["loso_oracle/acc"] == pytest.approx(1.0)
    assert "test-subject selection" in s["oracle_note"]
    assert "loso_oracle/uf1" not in summarize(last, None, class_names=["a", "b"], au_vocab=[])


def test_au_scores_only_where_an_au_head_was_trained():
    import torch

    from famnet_pl.losses import LossWeights
    from famnet_pl.models.module import MERLitModule

    last = pd.DataFrame({"fold": [0, 0, 1, 1], "subject": ["s1", "s1", "s2", "s2"], "dataset": "d",
                         "y_true": [0, 1, 0, 1], "y_pred": [0, 1, 1, 1],
                         "au1_true": [1, 0, 1, 0], "au1_mask": 1, "au1_prob": np.nan})
    # no head: no score
    assert "loso/au_f1" not in summarize(last, None, class_names=["a", "b"], au_vocab=[1])
    last["au1_prob"] = [0.9, 0.1, 0.2, 0.1]
    assert summarize(last, None, class_names=["a", "b"], au_vocab=[1])["loso/au_f1"] == pytest.approx(2 / 3)
    batch = {"x2d": torch.randn(2, 3, 32, 32), "index": torch.arange(2)}
    for wau, width in ((0.5, 4), (0.0, 0)):  # wau=0: the head exists but is never trained
        module = MERLitModule(model="amnet2d_r18", num_classes=2, num_aus=4,
                              loss_weights=LossWeights(wau=wau), net={"width_2d": 4, "small_input_2d": True})
        assert module.predict_step(batch)["au_probs"].shape == (2, width)


def test_a_class_missing_from_the_pooled_targets_is_a_warning_in_the_table():
    from famnet_pl.loso.aggregate import format_summary

    last = pd.DataFrame({"fold": [0, 0, 1], "subject": ["s1", "s1", "s2"], "dataset": "d",
                         "y_true": [0, 2, 0], "y_pred": [0, 2, 1]})
    summary = summarize(last, None, class_names=["a", "b", "c"], au_vocab=[])
    summary.update(protocol="p", complete=True)
    assert "WARNING: class b has no sample in the pooled test predictions" in format_summary(summary)
