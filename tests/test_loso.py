"""LOSO runner end to end on tiny synthetic data: smoke, W&B offline, resume, honest evaluation."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from famnet_pl.data import synthetic
from famnet_pl.loso.rundir import SUMMARY as SUMMARY_NAME
from famnet_pl.loso.runner import run_loso
from tests.conftest import tiny_args


@pytest.fixture(scope="module")
def finished_run(two_subjects, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    args = tiny_args(two_subjects, cache, **{"trainer.enable_checkpointing": "true"})
    summary = run_loso(args, exp="smoke", runs_dir=str(runs), wandb="offline", progress=False)
    return runs / "smoke" / "synth", args, summary


def test_two_fold_smoke_writes_every_artefact(finished_run):
    run_dir, _, summary = finished_run
    assert summary["complete"] and summary["n_folds"] == 2 and summary["n_samples"] == 8
    assert 0.0 <= summary["loso/uf1"] <= 1.0 and "loso_oracle/uf1" in summary
    assert (run_dir / SUMMARY_NAME).is_file() and (run_dir / "confusion.png").stat().st_size > 1000
    for fold_dir in sorted(run_dir.glob("fold_*")):
        assert fold_dir.name in {"fold_00_synth-sub01", "fold_01_synth-sub02"}
        preds = pd.read_csv(fold_dir / "predictions.csv")
        assert set(preds["epoch"]) == {1}                                    # last epoch of 2
        assert ({"sample_id", "subject", "y_true", "y_pred", "prob_happiness", "au12_prob"}
                <= set(preds.columns))
        assert preds["subject"].nunique() == 1
        assert set(pd.read_csv(fold_dir / "predictions_epochs.csv")["epoch"]) == {0, 1}
        assert (fold_dir / "config.yaml").is_file()                          # resolved config per fold
        assert list((fold_dir / "wandb").glob("offline-run-*"))               # one offline W&B run per fold
        assert list((fold_dir / "checkpoints").glob("*.ckpt"))                # last-epoch checkpoint per fold


def test_resume_skips_finished_folds(finished_run, monkeypatch):
    run_dir, args, summary = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("fold_*/predictions.csv")}
    import lightning

    def no_fit(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(lightning.Trainer, "fit", no_fit)
    again = run_loso(args, exp="smoke", runs_dir=str(run_dir.parents[1]), wandb="off", progress=False)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("fold_*/predictions.csv")} == before
    assert again["loso/uf1"] == summary["loso/uf1"]


def test_partial_fold_is_redone_and_summary_matches(finished_run, tmp_path):
    run_dir, args, _ = finished_run
    copy = tmp_path / "runs" / "smoke" / "synth"
    shutil.copytree(run_dir, copy)
    fold = copy / "fold_01_synth-sub02"
    (fold / "predictions.csv").unlink()            # as if killed after the epoch file was written
    (fold / "junk.tmp").write_text("partial")
    (copy / SUMMARY_NAME).unlink()
    run_loso(args, exp="smoke", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False)
    assert not (fold / "junk.tmp").exists()
    assert json.loads((copy / SUMMARY_NAME).read_text()) == json.loads((run_dir / SUMMARY_NAME).read_text())


def test_test_subject_evaluation_does_not_change_training(two_subjects, tmp_path):
    """Recording per-epoch test predictions (oracle) must not perturb the headline run."""
    args = tiny_args(two_subjects, tmp_path / "cache", **{"trainer.max_epochs": 3})
    heads = []
    for every in (1, 0):
        runs = tmp_path / f"every{every}"
        run_loso(args, exp="e", runs_dir=str(runs), wandb="off", eval_every=every, progress=False,
                 folds=["0"])
        heads.append(pd.read_csv(runs / "e" / "synth" / "fold_00_synth-sub01" / "predictions.csv"))
    pd.testing.assert_frame_equal(heads[0], heads[1])


def test_resume_with_a_changed_config_is_refused(finished_run):
    run_dir, args, _ = finished_run
    with pytest.raises(SystemExit, match="different config"):
        run_loso([*args, "--model.lr=0.5"], exp="smoke", runs_dir=str(run_dir.parents[1]), wandb="off",
                 progress=False)


def test_fold_out_of_range_is_refused(finished_run):
    run_dir, args, _ = finished_run
    with pytest.raises(SystemExit, match="out of range"):
        run_loso(args, exp="smoke", runs_dir=str(run_dir.parents[1]), folds=["7"], wandb="off",
                 progress=False)


def test_aggregate_command_keeps_a_partial_run_incomplete(finished_run, tmp_path, capsys):
    from famnet_pl.cli import main

    run_dir, _, _ = finished_run
    copy = tmp_path / "partial"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "fold_01_synth-sub02")
    assert main(["aggregate", str(copy)]) == 0
    summary = json.loads((copy / SUMMARY_NAME).read_text())
    assert summary["complete"] is False and summary["folds_missing"] == [1]
    assert "INCOMPLETE" in capsys.readouterr().out


def test_test_subject_evaluation_restores_the_global_rng(finished_run, two_subjects, tmp_path):
    """Even a test loader that draws from the global RNG must leave it as it was."""
    import torch
    from torch.utils.data import DataLoader

    from famnet_pl.config import build_cli
    from famnet_pl.loso.callback import LOSOCallback

    cli = build_cli([*tiny_args(two_subjects, tmp_path / "cache"), "--trainer.max_epochs=1",
                     f"--trainer.default_root_dir={tmp_path}"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    dm = cli.datamodule
    dm.test_dataloader = lambda: DataLoader(dm.test_set, batch_size=2, shuffle=True)  # global RNG
    torch.manual_seed(123)
    before = torch.get_rng_state()
    table = LOSOCallback(tmp_path, fold=0).predict_test(cli.trainer, cli.model, epoch=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(table["sample_id"]) == sorted(dm.manifest.iloc[dm.test_set.indices]["sample_id"])


def test_a_nan_loss_stops_the_fold_names_it_and_fails_the_run(two_subjects, tmp_path, capsys):
    from famnet_pl.cli import main

    args = tiny_args(two_subjects, tmp_path / "cache", **{"model.lr": "1e30"})
    code = main(["loso", "--exp", "nan", "--runs-dir", str(tmp_path / "runs"), "--wandb", "off",
                 "--folds", "0", "--no-progress", *args])
    err = capsys.readouterr().err
    fold_dir = tmp_path / "runs" / "nan" / "synth" / "fold_00_synth-sub01"
    assert code != 0 and not (fold_dir / "predictions.csv").exists()
    line = next(x for x in err.splitlines() if "non-finite" in x)
    assert "fold 0 (synth/sub01)" in line and "epoch 0, step " in line and "--model.lr" in line
    failed = json.loads((fold_dir / "failed.json").read_text())
    assert failed["fold"] == 0 and "non-finite" in failed["error"]
    assert not list(fold_dir.glob("checkpoints/resume-*.ckpt"))  # a rerun starts the fold over


@pytest.mark.parametrize("edit", ["delete_row", "truncate", "duplicate_row", "change_prob"])
def test_aggregate_refuses_tampered_predictions(finished_run, tmp_path, capsys, edit):
    from famnet_pl.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    path = run_dir / "fold_00_synth-sub01" / "predictions.csv"
    assert main(["aggregate", str(run_dir)]) == 0
    lines = path.read_text().splitlines(keepends=True)
    if edit == "delete_row":
        lines.pop(1)
    elif edit == "truncate":
        lines = ["".join(lines)[: len("".join(lines)) // 2]]
    elif edit == "duplicate_row":
        lines.append(lines[1])
    else:
        lines[1] = lines[1].replace(",0.", ",0.9", 1)
    path.write_text("".join(lines))
    capsys.readouterr()
    assert main(["aggregate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "FOLDS=0" in err[0]


@pytest.mark.parametrize("edit", ["delete_row", "duplicate_row"])
def test_aggregate_checks_counts_and_ids_without_a_checksum(finished_run, tmp_path, edit):
    from famnet_pl.loso.aggregate import PredictionsError, aggregate_run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    fold_dir = run_dir / "fold_01_synth-sub02"
    meta = json.loads((fold_dir / "metrics.json").read_text())
    del meta["predictions_sha256"]  # e.g. a run written before checksums existed
    (fold_dir / "metrics.json").write_text(json.dumps(meta))
    frame = pd.read_csv(fold_dir / "predictions.csv")
    frame = frame.iloc[1:] if edit == "delete_row" else pd.concat([frame, frame.iloc[:1]])
    frame.to_csv(fold_dir / "predictions.csv", index=False)
    with pytest.raises(PredictionsError, match="appears twice|samples, but the fold predicted"):
        aggregate_run(run_dir)


def test_a_relabelled_sheet_between_two_runs_of_one_experiment_is_refused(two_subjects, tmp_path):
    import openpyxl

    root = tmp_path / "data"
    shutil.copytree(two_subjects, root)
    args = tiny_args(root, tmp_path / "cache", **{"trainer.max_epochs": 1})
    run_loso(args, exp="relabel", runs_dir=str(tmp_path / "runs"), folds=["0"], wandb="off", progress=False)
    sheet = root / synthetic.SHEET_NAME
    book = openpyxl.load_workbook(sheet)
    rows = book.active
    column = [c.value for c in rows[1]].index("Estimated Emotion") + 1
    emotion = rows.cell(row=2, column=column)
    emotion.value = "surprise" if emotion.value != "surprise" else "happiness"
    book.save(sheet)
    with pytest.raises(SystemExit, match="different annotations"):
        run_loso(args, exp="relabel", runs_dir=str(tmp_path / "runs"), folds=["1"], wandb="off",
                 progress=False)


def test_disk_full_at_a_checkpoint_is_one_line_and_leaves_no_temp_file(two_subjects, tmp_path, capsys,
                                                                        monkeypatch):
    import errno
    import os

    from famnet_pl.cli import main

    real_replace = os.replace

    def replace(src, dst):  # the disk fills up exactly when a checkpoint is renamed into place
        if str(dst).endswith(".ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr("famnet_pl.utils.io.os.replace", replace)
    runs = tmp_path / "runs"
    code = main(["loso", "--exp", "full", "--runs-dir", str(runs), "--wandb", "off", "--folds", "0",
                 "--no-progress", *tiny_args(two_subjects, tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1 and len(err) == 1
    assert ("no space left on device for " in err[0] and ".ckpt: it needs " in err[0]
            and "MB are free" in err[0])
    fold_dir = runs / "full" / "synth" / "fold_00_synth-sub01"
    assert not list(fold_dir.rglob("*.tmp")) and not list(fold_dir.rglob("*.ckpt"))
    assert not (fold_dir / "predictions.csv").exists()


def test_an_unreadable_resume_checkpoint_is_set_aside_and_the_fold_starts_over(two_subjects, tmp_path,
                                                                               caplog):
    from famnet_pl.loso.plan import plan_loso
    from famnet_pl.loso.rundir import fold_dir_name, resume_checkpoint

    args, runs = tiny_args(two_subjects, tmp_path / "cache"), str(tmp_path / "runs")
    plan = plan_loso(args, exp="corrupt", runs_dir=runs)
    resume = resume_checkpoint(plan.run_dir / fold_dir_name(0, plan.subjects[0]), plan.config_hash)
    resume.parent.mkdir(parents=True)
    resume.write_bytes(b"PK\x03\x04 cut short by a full disk")
    summary = run_loso(args, exp="corrupt", runs_dir=runs, folds=["0"], wandb="off", progress=False)
    assert summary is not None and summary["folds_done"] == [0]
    corrupt = plan.run_dir / f"fold_00_synth-sub01-{resume.name}.corrupt"
    assert corrupt.is_file() and "does not load" in caplog.text and "set aside" in caplog.text


def test_a_sample_left_out_at_preprocessing_is_in_every_record_and_the_table(two_subjects, tmp_path):
    from famnet_pl.data.manifest import build_manifest
    from famnet_pl.loso.aggregate import format_summary

    root = tmp_path / "data"
    shutil.copytree(two_subjects, root)
    # a sample of sub01, fold 0's test subject
    row = build_manifest(protocol="synth_4cls", root=root)[0].iloc[0]
    (root / row["frame_dir"] / row["frame_pattern"].format(k=int(row["apex"]))).write_bytes(b"not a jpeg")
    summary = run_loso(tiny_args(root, tmp_path / "cache", **{"trainer.max_epochs": 1}), exp="drop",
                       runs_dir=str(tmp_path / "runs"), wandb="off", progress=False)
    run_dir = tmp_path / "runs" / "drop" / "synth"
    for record in (json.loads((run_dir / "run.json").read_text()), summary,
                   json.loads((run_dir / "fold_00_synth-sub01" / "metrics.json").read_text())):
        (dropped,) = record["dropped"]
        assert dropped["sample_id"] == row["sample_id"] and dropped["subject"] == "synth/sub01"
        assert str(root / row["frame_dir"]) in dropped["error"]
    assert summary["n_samples"] == 7
    table = format_summary(summary)
    assert "1 samples left out at preprocessing" in table and row["sample_id"] in table


def test_bad_fold_selection_is_one_line_and_exit_2(finished_run, tmp_path, capsys):
    from famnet_pl.cli import main

    _, args, _ = finished_run
    assert main(["loso", "--exp", "x", "--runs-dir", str(tmp_path), "--folds", "7", "--no-progress",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("famnet-pl loso: error: --folds: fold 7 out of range")


def test_the_fusion_weight_chosen_on_validation_is_the_one_the_test_predictions_and_checkpoint_use(
        tiny_synth, tmp_path):
    import torch

    from famnet_pl.config import build_cli
    from famnet_pl.models.module import MERLitModule

    args = tiny_args(tiny_synth, tmp_path / "cache", **{"trainer.enable_checkpointing": "true",
                                                       "model.late_weight_from": "val",
                                                       "data.val_subjects": 1})
    run_loso(args, exp="w", runs_dir=str(tmp_path / "runs"), folds=["0"], wandb="off", progress=False)
    fold_dir = tmp_path / "runs" / "w" / "synth" / "fold_00_synth-sub01"
    logged = pd.read_csv(fold_dir / "metrics.csv").dropna(subset=["val/late_weight"])["val/late_weight"]
    (ckpt,) = fold_dir.glob("checkpoints/*.ckpt")
    module = MERLitModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    assert float(module.net.fusion.late_weight) == pytest.approx(logged.iloc[-1])
    dm = build_cli([*args, "--data.fold=0"]).datamodule
    dm.setup("test")
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())))
    with torch.no_grad():
        probs = module.predict_step(batch)["probs"].numpy()
    recorded = pd.read_csv(fold_dir / "predictions.csv")
    np.testing.assert_allclose(recorded[[c for c in recorded if c.startswith("prob_")]].to_numpy(), probs,
                               atol=2e-6)
    # the branches' own probabilities are recorded too, and the headline is their fusion at that weight
    w = float(logged.iloc[-1])
    names = [c.removeprefix("prob_") for c in recorded if c.startswith("prob_")]
    for file in ("predictions.csv", "val_predictions_epochs.csv"):
        table = pd.read_csv(fold_dir / file)
        table = table[table["epoch"] == table["epoch"].max()]
        p2d, p3d = (table[[f"prob{b}_{n}" for n in names]].to_numpy() for b in ("2d", "3d"))
        np.testing.assert_allclose(table[[f"prob_{n}" for n in names]].to_numpy(), w * p2d + (1 - w) * p3d,
                                   atol=2e-6)
