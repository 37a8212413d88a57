"""DDP inside a fold (``--trainer.devices 2`` on CPU, gloo): the fold runs in its own process whose
command line Lightning re-runs for rank 1, and the test subject's predictions are gathered from
both ranks once per sample. The test subject has 3 samples, so a DistributedSampler would have
padded it to 4 (a repeated sample counted twice in the pooled metrics). About 25 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from tests.conftest import tiny_args


def test_ddp_fold_gathers_each_test_sample_once(tiny_synth, tmp_path):
    dropped = "synth/sub01/EP05_03"
    args = tiny_args(tiny_synth, tmp_path / "cache", **{"trainer.max_epochs": 2, "trainer.devices": 2,
                                                        "trainer.strategy": "ddp",
                                                        "data.drop": f"[{dropped}]"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", "ddp", "--runs-dir",
                             str(tmp_path / "runs"), "--wandb", "off", "--no-progress",
                             "--folds", "0", *args],
                            env=env, capture_output=True, text=True, timeout=600)
    fold = tmp_path / "runs" / "ddp" / "synth" / "fold_00_synth-sub01"
    assert result.returncode == 0, (result.stderr[-3000:]
                                    + (fold.parent / "logs" / "fold_00.log").read_text()[-3000:])
    meta = json.loads((fold / "metrics.json").read_text())
    assert meta["world_size"] == 2 and meta["n_test"] == 3
    last = pd.read_csv(fold / "predictions.csv")
    assert len(last) == 3 and last["sample_id"].is_unique and dropped not in set(last["sample_id"])
    assert set(last["sample_id"]) == {"synth/sub01/EP05_05", "synth/sub01/EP11_01", "synth/sub01/EP11_02"}
    epochs = pd.read_csv(fold / "predictions_epochs.csv")
    assert epochs.groupby("epoch")["sample_id"].nunique().tolist() == [3, 3] and len(epochs) == 6
