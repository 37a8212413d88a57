"""A LOSO run killed (SIGKILL) midway and restarted ends with the same summary as an uninterrupted
run with the same seed. Runs the real CLI in subprocesses (about 30 s on 2 cores)."""

import json
import os
import signal
import subprocess
import sys
import time

from famnet_pl.aggregate import SUMMARY_NAME
from tests.conftest import tiny_args

def _cmd(root, cache, runs):
    return [sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", "k", "--runs-dir", str(runs),
            "--wandb", "off", *tiny_args(root, cache, **{"trainer.max_epochs": 3})]


def test_killed_run_resumes_to_the_same_summary(tiny_synth, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = tmp_path / "cache"
    reference = tmp_path / "ref"
    subprocess.run(_cmd(tiny_synth, cache, reference), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_synth, cache, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = killed / "k" / "synth" / "fold_00_synth-sub01" / "predictions.csv"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = killed / "k" / "synth"
    assert first.exists() and not (run_dir / "fold_02_synth-sub03" / "predictions.csv").exists()
    done_before = first.stat().st_mtime_ns

    subprocess.run(_cmd(tiny_synth, cache, killed), check=True, env=env, capture_output=True, timeout=600)
    assert first.stat().st_mtime_ns == done_before          # the finished fold was not redone
    ours = json.loads((run_dir / SUMMARY_NAME).read_text())
    ref = json.loads((reference / "k" / "synth" / SUMMARY_NAME).read_text())
    assert ours == ref
