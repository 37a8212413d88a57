"""Fold-parallel LOSO: wall time of the demo LOSO (synthetic set, famnet_cpu, 5 epochs) run
sequentially and with JOBS=2, their ratio, and whether the summaries' metrics are equal.

Equal results need equal CPU threads per fold (the thread count changes float summation order), so
the sequential reference runs with --threads 1, like each of the two fold processes; the default
sequential run (all cores for one fold) is timed too. Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "loso_jobs"
CONFIG = ["--config", "experiments/base.yaml", "--config", "experiments/data/synth.yaml",
          "--config", "experiments/model/famnet_cpu.yaml", "--trainer.max_epochs=5"]


def run(name: str, *options: str) -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", name, "--runs-dir", str(OUT),
                    "--wandb", "off", "--no-progress", *options, *CONFIG], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((OUT / name / "synth" / "loso_summary.json").read_text())
    return seconds, {k: v for k, v in summary.items() if k.startswith("loso")}


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    run("warmup", "--folds", "0")  # data generation and preprocessing cache, not timed below
    seq_default, _ = run("seq_default")
    seq_one, reference = run("seq_1thread", "--threads", "1")
    par, parallel = run("jobs2", "--jobs", "2", "--threads", "1")
    print(f"LOSO demo, 8 folds x 5 epochs: sequential {seq_default:.1f} s (all cores per fold), "
          f"{seq_one:.1f} s (1 thread per fold); JOBS=2 {par:.1f} s; "
          f"ratio sequential(1 thread)/JOBS=2 = {seq_one / par:.2f}; metrics equal: {reference == parallel}")


if __name__ == "__main__":
    main()
