"""A tiny model's LOSO: ``famnet-pl loso`` against a minimal hand-written PyTorch loop over the same
tensors. STSTNet on a fabricated MEGC2019 precomputed-flow layout (3 datasets x 23 subjects x 3
classes x 2 = 414 samples, 69 subjects: the real composite has 442 and 68), 20 epochs, batch 32,
AdamW with the cosine schedule of experiments/model/ststnet.yaml.

``famnet-pl loso --stack-folds`` trains every fold's copy at once (loso/stacked.py); the bare
loop trains one fold after another, with each fold's training tensors from the same DataModule
(normalised, no augmentation: the floor of what one fold's optimisation costs) and predicts the
test subject once. The harness also augments, records test and validation predictions every epoch
and writes every fold's files. ``--folds N`` times the first N folds only (both sides);
``--sequential N`` also times the sequential harness on N folds. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "tiny_loso"
CONFIG = ["--config", "experiments/base.yaml", "--config", "experiments/data/megc2019_flow.yaml",
          "--config", "experiments/model/ststnet.yaml", "--trainer.max_epochs=20", "--data.val_subjects=0"]


def harness(root: Path, folds: int | None, stacked: bool) -> float:
    argv = [sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", "tiny" + "_stacked" * stacked,
            "--runs-dir", str(OUT / "runs"), "--wandb", "off", "--no-progress",
            *(["--stack-folds"] * stacked),
            *(["--folds", ",".join(map(str, range(folds)))] if folds else []),
            *CONFIG, f"--data.data_root={root}", f"--data.cache_dir={OUT / 'cache'}"]
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bare(root: Path, folds: int | None) -> tuple[float, int]:
    start = time.perf_counter()
    import torch

    from famnet_pl.config import build_cli
    from famnet_pl.models.registry import create_model

    dm = build_cli([*CONFIG, f"--data.data_root={root}", f"--data.cache_dir={OUT / 'cache'}",
                    "--data.augment=false", "--trainer.logger=false"]).datamodule
    n_folds = len(dm.subjects()) if not folds else folds
    for k in range(n_folds):
        dm.hparams.fold, dm._ready = k, False
        dm.setup("fit")
        train = dm.train_set
        x = train.tensors(range(len(train)))["x2d"]
        y = torch.as_tensor(train.labels[train.indices])
        torch.manual_seed(k)
        net = create_model("ststnet", num_classes=dm.num_classes, num_aus=0, in_channels_2d=3, au_head=False)
        opt = torch.optim.AdamW(net.parameters(), lr=0.005, weight_decay=1e-4)
        steps = math.ceil(len(x) / 32)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / 20)))
        for _ in range(20):
            for idx in torch.randperm(len(x)).split(32):
                loss = torch.nn.functional.cross_entropy(net(x2d=x[idx])["emotion"], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            test = dm.test_set
            net.eval()(x2d=test.tensors(range(len(test)))["x2d"])
    return time.perf_counter() - start, n_folds * steps * 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=None, help="time the first N folds only")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="also time the sequential harness (no --stack-folds) on the first N folds")
    args = parser.parse_args()
    folds = args.folds
    shutil.rmtree(OUT, ignore_errors=True)
    root = OUT / "megc2019_flow"
    subprocess.run([sys.executable, "-m", "famnet_pl.cli", "fabricate", "megc2019_flow", str(root),
                    "--subjects", "23", "--per-class", "2"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    # the preprocessing cache first (both sides read it; not what is compared)
    subprocess.run([sys.executable, "-m", "famnet_pl.cli", "preprocess",
                    "experiments/data/megc2019_flow.yaml",
                    f"--data-root={root}", f"--data.cache_dir={OUT / 'cache'}", "--data.image_size=28"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stacked = harness(root, folds, stacked=True)
    loop, steps = bare(root, folds)
    n = folds or "all 69"
    print(f"tiny-model LOSO (STSTNet, {n} folds x 20 epochs, {steps} optimiser steps in a sequential run): "
          f"famnet-pl loso --stack-folds {stacked:.1f} s, bare PyTorch loop {loop:.1f} s, ratio "
          f"{stacked / loop:.2f} (goal <= 1.2, and <= 2 min)")
    if args.sequential:
        ours = harness(root, args.sequential, stacked=False)
        part, _ = bare(root, args.sequential)
        print(f"  one fold after another (famnet-pl loso without --stack-folds), first {args.sequential} "
              f"folds: {ours:.1f} s against the bare loop's {part:.1f} s, ratio {ours / part:.2f}")


if __name__ == "__main__":
    main()
