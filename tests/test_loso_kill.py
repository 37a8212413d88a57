"""A LOSO run killed (SIGKILL) midway and restarted ends with the same summary as an uninterrupted
run with the same seed: finished folds are kept, the fold that was running continues from its
resume checkpoint (not from scratch), and no fold is counted twice. Runs the real CLI in
subprocesses (about 40 s on 2 cores)."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from famnet_pl.loso.rundir import SUMMARY as SUMMARY_NAME
from tests.conftest import tiny_args


def _cmd(root, cache, runs):
    return [sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", "k", "--runs-dir", str(runs),
            "--no-progress", "--wandb", "off",
            *tiny_args(root, cache, **{"trainer.max_epochs": 4, "trainer.enable_checkpointing": "true"})]


def test_killed_run_resumes_from_its_checkpoint_to_the_same_summary(tiny_synth, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = tmp_path / "cache"
    reference = tmp_path / "ref"
    subprocess.run(_cmd(tiny_synth, cache, reference), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    run_dir = killed / "k" / "synth"
    proc = subprocess.Popen(_cmd(tiny_synth, cache, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = run_dir / "fold_00_synth-sub01" / "predictions.csv"
    second = run_dir / "fold_01_synth-sub02"
    deadline = time.time() + 300
    # Kill once fold 0 is done and fold 1 has saved a resume checkpoint (after 1 to 3 epochs).
    while (not list(second.glob("checkpoints/resume-*.ckpt")) and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (second / "predictions.csv").exists()
    done_before = first.stat().st_mtime_ns

    rerun = subprocess.run(_cmd(tiny_synth, cache, killed), check=True, env=env, capture_output=True,
                           text=True, timeout=600)
    assert "fold 1 (synth/sub02): resuming from" in rerun.stderr    # continued, not restarted
    assert first.stat().st_mtime_ns == done_before                   # the finished fold was not redone
    assert not list(run_dir.glob("fold_*/checkpoints/resume-*.ckpt"))  # removed once the fold finished
    # Lightning's own checkpoint: the final one only, not also the one the killed part saved.
    assert [p.name for p in second.glob("checkpoints/*.ckpt")] == ["epoch=3-step=8.ckpt"]
    # both logs kept
    assert (second / "metrics.csv").is_file() and (second / "resumed_1" / "metrics.csv").is_file()
    ours = json.loads((run_dir / SUMMARY_NAME).read_text())
    ref = json.loads((reference / "k" / "synth" / SUMMARY_NAME).read_text())
    assert ours == ref and ours["n_samples"] == 12 and ours["folds_done"] == [0, 1, 2]
    # Every evaluated epoch of the resumed fold is there once: restored rows + the epochs after.
    epochs = pd.read_csv(second / "predictions_epochs.csv")
    assert sorted(epochs["epoch"].unique()) == [0, 1, 2, 3] and len(epochs) == 4 * 4
    assert (second / "predictions_epochs.csv").read_bytes() == (
        reference / "k" / "synth" / "fold_01_synth-sub02" / "predictions_epochs.csv").read_bytes()
