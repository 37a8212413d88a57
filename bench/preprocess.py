"""Preprocessing throughput: samples/s with 1 and 2 worker processes on a cold cache, and how much
faster a second run with the same config is (served from the cache).

Runs on the built-in synthetic set (generated into data/synth if missing) for two configs: the
demo's (experiments/data/synth.yaml: Farneback, 48 px) and the framework default (TV-L1, 64 px,
clips 8 x 48). Each cold run uses a fresh cache folder under bench/out/. Prints figures; asserts
nothing (tests check behaviour, benchmarks measure speed).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from famnet_pl.data import synthetic  # noqa: E402
from famnet_pl.data.manifest import build_manifest  # noqa: E402
from famnet_pl.data.preprocess import ViewConfig, preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "demo (synth.yaml: farneback, 48 px, flow-sequence clips 8x32)": ViewConfig(
        image_size=48, clip_len=8, clip_size=32, flow_algorithm="farneback", flow_size=128, clip_view="flow"),
    "default (tvl1, 64 px, clips 8x48)": ViewConfig(),
}


def main() -> None:
    root = REPO / "data" / "synth"
    synthetic.ensure(root)
    manifest, _ = build_manifest(protocol="synth_4cls", root=root)
    out = REPO / "bench" / "out" / "preprocess"
    n = len(manifest)
    print(f"preprocessing {n} synthetic samples ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)")
    figures = {}
    for name, views in CONFIGS.items():
        row = {}
        for workers in (1, 2):
            cache = out / f"{len(figures)}-{workers}"
            shutil.rmtree(cache, ignore_errors=True)
            start = time.perf_counter()
            preprocess(manifest, root, views, cache, workers=workers, progress=False)
            row[f"cold_{workers}w_s"] = time.perf_counter() - start
        start = time.perf_counter()
        warm = preprocess(manifest, root, views, cache, workers=2, progress=False)
        row["warm_s"] = time.perf_counter() - start
        assert warm.built == 0  # served from the cache
        row["cached_speedup"] = row["cold_2w_s"] / row["warm_s"]
        row["workers_speedup"] = row["cold_1w_s"] / row["cold_2w_s"]
        figures[name] = row
        print(f"  {name}: 1 worker {n / row['cold_1w_s']:.1f} samples/s, 2 workers "
              f"{n / row['cold_2w_s']:.1f} samples/s (x{row['workers_speedup']:.2f}); second run "
              f"{row['warm_s'] * 1000:.1f} ms = {row['cached_speedup']:.0f}x faster than the first")
    (out / "figures.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
