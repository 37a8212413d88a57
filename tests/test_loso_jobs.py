"""Fold-parallel LOSO: separate fold processes give the same summary as one sequential run, and a
crashing fold is reported without taking the others down; it can be rerun alone."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from famnet_pl.data.manifest import build_manifest
from famnet_pl.loso.runner import run_loso
from tests.conftest import tiny_args

METRICS = ("loso/uf1", "loso/uar", "loso/acc", "loso_oracle/uf1", "loso_perfold/uf1_mean")


@pytest.fixture()
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # run_loso(threads=1) sets it for this whole process


def test_two_jobs_equal_one_and_a_crashed_fold_is_rerun_alone(tiny_synth, tmp_path, capsys, restore_threads):
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    args = tiny_args(root, tmp_path / "cache", **{"trainer.max_epochs": 2})
    one = run_loso(args, exp="one", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, threads=1)
    two = run_loso(args, exp="two", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, jobs=2,
                   threads=1)                           # equal threads per fold: equal results, bit for bit
    assert {k: one[k] for k in METRICS} == {k: two[k] for k in METRICS}
    for fold in ("fold_00_synth-sub01", "fold_02_synth-sub03"):
        assert ((tmp_path / "runs" / "one" / "synth" / fold / "predictions.csv").read_bytes()
                == (tmp_path / "runs" / "two" / "synth" / fold / "predictions.csv").read_bytes())

    # Every sample of sub02 unreadable: fold 1 crashes, folds 0 and 2 finish.
    manifest = build_manifest(protocol="synth_4cls", root=root)[0]
    saved = {}
    for r in manifest[manifest["subject"] == "synth/sub02"].itertuples():
        frame = root / r.frame_dir / r.frame_pattern.format(k=r.onset)
        saved[frame] = frame.read_bytes()
        frame.unlink()                      # replaced, not overwritten: the folder's timestamp changes
        frame.write_bytes(saved[frame][:100])
    capsys.readouterr()
    assert run_loso(args, exp="crash", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False,
                    jobs=2) is None
    err = capsys.readouterr().err
    assert "fold 1 (synth/sub02) FAILED" in err and "FOLDS=1" in err
    run = tmp_path / "runs" / "crash" / "synth"
    assert json.loads((run / "loso_summary.json").read_text())["folds_missing"] == [1]
    assert (run / "logs" / "fold_01.log").read_text().count("was left out") >= 1

    for frame, data in saved.items():
        frame.unlink()
        frame.write_bytes(data)
    again = run_loso(args, exp="crash", runs_dir=str(tmp_path / "runs"), folds=["1"], wandb="off",
                     progress=False, jobs=2)
    assert again["complete"] and {k: again[k] for k in METRICS} == {k: one[k] for k in METRICS}


def test_a_busy_machine_is_warned_about(monkeypatch, caplog):
    from famnet_pl.loso import runner

    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.5, 0.0, 0.0))
    with caplog.at_level("WARNING"):
        assert runner.warn_if_busy() == cores + 1.5
    assert f"already exceeds its {cores} cores" in caplog.text
    caplog.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    runner.warn_if_busy()
    assert "exceeds" not in caplog.text


def test_dataloader_workers_share_the_cores_with_their_process(tiny_synth, tmp_path, restore_threads,
                                                               monkeypatch):
    """cores / processes threads: with 1 DataLoader worker the fold's own process takes half the
    cores (at least 1) unless --threads says otherwise."""
    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    args = tiny_args(tiny_synth, tmp_path / "cache", **{"data.num_workers": 1, "trainer.max_epochs": 1})
    run_loso(args, exp="w", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, folds=["0"])
    assert torch.get_num_threads() == 2
