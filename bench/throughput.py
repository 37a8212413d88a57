"""Training throughput: the full pipeline (DataModule batches -> device -> views and augmentation
on the device -> train step) against the model alone (one ready batch reused -> train step), and
their ratio. ``--model.channels_last=true``, ``--model.compile=true``, ``--precision bf16`` and
``--data.batch_size=N`` are the GPU levers (bench/gpu.sh runs them).

A ratio near 1.0 means data loading is not the bottleneck. Run ``make bench`` (CPU, demo configs)
or, on a GPU machine, ``make bench ARGS="--model-config experiments/model/famnet.yaml
--data.image_size=112 ..."`` (options it does not know go to the config). Prints figures; asserts
nothing (tests check behaviour, benchmarks measure speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _train_step(module, batch, optimizer, autocast) -> None:
    with autocast:
        outputs = module(batch["x2d"], batch["x3d"])
        loss, _ = module.criterion(outputs, batch["label"], batch["au"], batch["au_mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _timed(step, batches, warmup: int, device: torch.device) -> float:
    """Seconds for the steps after ``warmup``; ``batches`` yields device-ready batches."""
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-config", default=str(REPO / "experiments/data/synth.yaml"))
    parser.add_argument("--model-config", default=str(REPO / "experiments/model/famnet_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"], help="bf16 autocast (GPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    opts, extra = parser.parse_known_args(argv)

    from famnet_pl.config import build_cli

    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else "cpu" if opts.device == "auto" else opts.device)
    cli = build_cli(["--config", str(REPO / "experiments/base.yaml"), "--config", opts.data_config,
                     "--config", opts.model_config, "--trainer.logger=false", *extra])
    dm, module = cli.datamodule, cli.model.to(device).train()
    dm.setup("fit")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
    total = opts.warmup + opts.steps

    def pipeline_batches():
        count = 0
        while True:
            for batch in dm.train_dataloader():
                # as Lightning moves it: the cache's uint8 / float32 arrays, then the views on the device
                moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                yield dm.on_after_batch_transfer(moved)
                count += 1
                if count == total:
                    return

    first = next(iter(dm.train_dataloader()))
    fixed = dm.on_after_batch_transfer({k: v.to(device) for k, v in first.items()})
    batch_size = len(fixed["label"])
    def step(batch: dict) -> None:
        _train_step(module, batch, optimizer, autocast)

    model_s = _timed(step, (fixed for _ in range(total)), opts.warmup, device)
    pipe_s = _timed(step, pipeline_batches(), opts.warmup, device)
    figures = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "threads": torch.get_num_threads(), "batch_size": batch_size, "steps": opts.steps,
        "precision": opts.precision,
        "x2d": list(fixed["x2d"].shape[1:]), "x3d": list(fixed["x3d"].shape[1:]),
        "params": sum(p.numel() for p in module.parameters()),
        "model_samples_per_s": opts.steps * batch_size / model_s,
        "pipeline_samples_per_s": opts.steps * batch_size / pipe_s,
    }
    figures["pipeline_over_model"] = figures["pipeline_samples_per_s"] / figures["model_samples_per_s"]
    print(f"device {figures['device']} ({figures['threads']} threads), batch {batch_size}, "
          f"x2d {figures['x2d']}, x3d {figures['x3d']}, {figures['params'] / 1e6:.2f} M params, "
          f"precision {opts.precision}")
    print(f"model alone (in-memory batch)   {figures['model_samples_per_s']:9.1f} samples/s")
    print(f"full pipeline (DataModule)      {figures['pipeline_samples_per_s']:9.1f} samples/s")
    print(f"pipeline / model ratio          {figures['pipeline_over_model']:9.3f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
