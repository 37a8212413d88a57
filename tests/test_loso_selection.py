"""Honest selection: pooled inner validation, epochs chosen on it, seeds and ensembles, the report;
and the leak test: test labels can move test scores only."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from famnet_pl.data.datamodule import MERDataModule
from famnet_pl.loso.aggregate import aggregate_run, format_summary
from famnet_pl.loso.rundir import PREDICTIONS, VAL_PREDICTIONS_EPOCHS
from famnet_pl.loso.runner import run_loso
from famnet_pl.metrics import select_epochs
from tests.conftest import relabel, tiny_args

SELECTION_KEYS = ("valsel_epochs", "valsel_epochs_perfold")


@pytest.fixture(scope="module")
def val_run(tiny_synth, tmp_path_factory):
    """3 folds, 3 epochs, one inner-validation subject per fold."""
    runs, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    args = tiny_args(tiny_synth, cache, **{"data.val_subjects": 1, "trainer.max_epochs": 3, "model.lr": 0.03})
    summary = run_loso(args, exp="val", runs_dir=str(runs), wandb="off", progress=False)
    return runs / "val" / "synth", args, runs, summary


def test_inner_validation_is_recorded_pooled_and_selects_an_epoch(val_run):
    run_dir, _, _, summary = val_run
    for key in ("loso_val/uf1", "loso_val/uar", "loso_valsel/uf1", "loso_valsel/uar",
                "loso_valsel_perfold/uf1"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert set(summary["valsel_epochs"]) == set(summary["valsel_epochs_perfold"]) == {0, 1, 2}   # folds
    assert set(summary["valsel_epochs"].values()) <= {0, 1, 2}
    assert set(summary["val_uf1_by_epoch"]) == {0, 1, 2}
    for fold_dir in sorted(run_dir.glob("fold_*")):
        val = pd.read_csv(fold_dir / VAL_PREDICTIONS_EPOCHS)
        test_subject = pd.read_csv(fold_dir / PREDICTIONS)["subject"].iloc[0]
        assert set(val["epoch"]) == {0, 1, 2} and val["subject"].nunique() == 1
        assert test_subject not in set(val["subject"])          # never the test subject
    on_disk = json.loads((run_dir / "loso_summary.json").read_text())
    assert on_disk["loso_valsel/uf1"] == summary["loso_valsel/uf1"]
    table = format_summary(summary)
    assert "pooled, val-selected (epoch" in table and "inner validation" in table


def test_leak_test_labels_move_only_test_scores(val_run, tmp_path):
    run_dir, _, _, summary = val_run
    copy = tmp_path / "synth"
    shutil.copytree(run_dir, copy)
    relabel(copy)
    moved = aggregate_run(copy, expected_folds=3)
    for key in (*SELECTION_KEYS, "val_uf1_by_epoch", *[k for k in summary if k.startswith("loso_val/")]):
        assert moved[key] == summary[key], key                     # selection never read a test label
    assert moved["confusion"] != summary["confusion"]                  # the test scores did see them


def test_leak_test_a_subject_never_chooses_its_own_folds_epoch(val_run, tmp_path):
    """Subject k is an inner-validation subject of other folds: its labels changed everywhere (its
    test files and the other folds' validation files) must leave fold k's chosen epochs alone."""
    run_dir, _, _, summary = val_run
    for fold, subject in enumerate(pd.read_csv(p)["subject"][0]
                                   for p in sorted(run_dir.glob(f"fold_*/{PREDICTIONS}"))):
        copy = tmp_path / f"k{fold}" / "synth"
        shutil.copytree(run_dir, copy)
        relabel(copy, subject)
        moved = aggregate_run(copy, expected_folds=3)
        assert moved["valsel_epochs"][fold] == summary["valsel_epochs"][fold], subject
        assert moved["valsel_epochs_perfold"][fold] == summary["valsel_epochs_perfold"][fold], subject


def test_selection_rules_read_validation_only_and_ties_go_to_the_later_epoch():
    rows = []
    for fold in (0, 1):
        for epoch, correct in ((0, [1, 0]), (1, [1, 1]), (2, [1, 1])):
            for i, ok in enumerate(correct):
                rows.append({"fold": fold, "epoch": epoch, "y_true": i, "y_pred": i if ok else 1 - i})
    frame = pd.DataFrame(rows).assign(subject=lambda f: np.where(f["fold"] == 0, "s1", "s0"))
    chosen = select_epochs(frame, 2, {0: "s0", 1: "s1"}, "subject")
    assert chosen["per_fold"] == {0: 2, 1: 2}                             # 1 and 2 tie: the later
    assert chosen["global"] == {0: 2, 1: 2}
    assert chosen["val_uf1_by_epoch"][0] < chosen["val_uf1_by_epoch"][1] == chosen["val_uf1_by_epoch"][2]
    # Fold 0's epoch is chosen without subject s0 (fold 1's validation subject here): make s0 prefer
    # epoch 0 and s1 epoch 1; fold 0 then follows s1 only, fold 1 s0 only.
    frame["y_pred"] = frame["y_true"]
    preferred = frame["subject"].map({"s0": 0, "s1": 1})
    wrong = frame["epoch"] != preferred
    frame.loc[wrong, "y_pred"] = 1 - frame.loc[wrong, "y_true"]
    assert select_epochs(frame, 2, {0: "s0", 1: "s1"}, "subject")["global"] == {0: 1, 1: 0}


def _inner(subjects, val_subjects, seed=0, fold=0):
    hparams = SimpleNamespace(val_subjects=val_subjects, seed=seed, fold=fold, split="subject")
    owner = SimpleNamespace(hparams=hparams)
    return MERDataModule._inner_validation(owner, subjects)


def test_inner_validation_draw_single_dataset_unchanged_and_composites_stratified():
    subjects = [f"casme2/sub{i:02d}" for i in range(1, 21)]
    expected = sorted(np.random.default_rng([0, 0]).choice(subjects, size=2, replace=False).tolist())
    assert _inner(subjects, 2) == expected                               # the draw every run had so far
    assert len(_inner(subjects, 0.25)) == 5
    mixed = [*subjects, *[f"samm/{i:03d}" for i in range(6, 16)], *[f"smic/s{i}" for i in range(1, 6)]]
    drawn = _inner(mixed, 7)                                             # 20 : 10 : 5 training subjects
    per = {d: sum(s.startswith(d + "/") for s in drawn) for d in ("casme2", "samm", "smic")}
    assert per == {"casme2": 4, "samm": 2, "smic": 1}
    per = {d: sum(s.startswith(d + "/") for s in _inner(mixed, 0.2)) for d in ("casme2", "samm", "smic")}
    assert per == {"casme2": 4, "samm": 2, "smic": 1}
    with pytest.raises(ValueError, match="val_subjects=1.5"):
        _inner(subjects, 1.5)


def test_seeds_give_mean_std_and_an_ensemble_of_averaged_probabilities(val_run, tmp_path, capsys):
    from famnet_pl.loso.options import LosoOptions
    from famnet_pl.studies.seeds import run_seeds

    _, args, _, _ = val_run
    options = LosoOptions(exp="s", runs_dir=str(tmp_path), wandb="off", progress=False)
    study = run_seeds([*args, "--trainer.max_epochs=2"], options, [0, 1], ensemble="mean")
    assert study["seeds"] == [0, 1]
    uf1 = study["metrics"]["loso/uf1"]
    assert len(uf1["values"]) == 2 and uf1["mean"] == pytest.approx(np.mean(uf1["values"]))
    assert "loso_val/uf1" in study["metrics"] and "loso/uf1" in study["ensemble"]
    out = tmp_path / "s" / "seeds" / "synth"
    assert (out / "seeds.json").is_file() and (out / "ensemble" / "loso_summary.json").is_file()
    # The ensemble's prediction is the argmax of the members' mean probabilities.
    members = [pd.read_csv(next((tmp_path / "s" / f"seed{s}" / "synth").glob(f"fold_00_*/{PREDICTIONS}")))
               for s in (0, 1)]
    probs = [m.sort_values("sample_id")[[c for c in m if c.startswith("prob_")]].to_numpy() for m in members]
    ensemble = json.loads((out / "ensemble" / "loso_summary.json").read_text())
    assert ensemble["n_samples"] == 12 and np.mean(probs, 0).shape == probs[0].shape
    assert "mean ± std over seeds" in capsys.readouterr().out


def test_report_table_latex_and_confusion_grid(val_run, tmp_path):
    from famnet_pl.studies.report import main

    run_dir, _, _, summary = val_run
    out = tmp_path / "report"
    assert main([str(run_dir), "--out", str(out), "--names", "famnet tiny"]) == 0
    markdown = (out / "report.md").read_text()
    assert f"| famnet tiny | 3 | 12 | {summary['loso/uf1']:.3f} |" in markdown
    assert f"{summary['loso_valsel/uf1']:.3f}" in markdown and "oracle (not a result)" in markdown
    tex = (out / "report.tex").read_text()
    assert r"\toprule" in tex and "famnet tiny" in tex and (out / "confusion.png").stat().st_size > 1000
