"""Shared fixtures: a tiny synthetic dataset (CASME II format) and CPU-safe CLI arguments.

Environment for every test: no network (HF_HUB_OFFLINE), W&B offline with its files in a temp dir,
no albumentations update check. Seeds are set per test where results are compared.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
_wandb_tmp = tempfile.mkdtemp(prefix="famnet-wandb-")
os.environ.setdefault("WANDB_CACHE_DIR", _wandb_tmp)
os.environ.setdefault("WANDB_CONFIG_DIR", _wandb_tmp)
os.environ.setdefault("WANDB_DATA_DIR", _wandb_tmp)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "annotations"
CASME2_2014 = SHARED / "casme2" / "CASME2-coding-20140508.xlsx"
CASME2_2019 = SHARED / "casme2" / "CASME2-coding-20190701.xlsx"


def pytest_collection_modifyitems(config, items):
    """Tests that read the real sheets need ../shared/annotations beside the repo (CI has it)."""
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED} not found: clone the repo next to shared/ to run it")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


def _tiny_set(tmp_path_factory, name: str, *, n_subjects: int, max_frames: int, seed: int) -> Path:
    from famnet_pl.data import synthetic

    root = tmp_path_factory.mktemp(name)
    synthetic.generate(root, synthetic.SynthSpec(n_subjects=n_subjects, clips_per_class=1, image_size=64,
                                                 min_frames=8, max_frames=max_frames, seed=seed))
    return root


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """3 subjects x 4 classes x 1 clip, 64 px, 8-10 frames: seconds to generate."""
    return _tiny_set(tmp_path_factory, "synth", n_subjects=3, max_frames=10, seed=1)


@pytest.fixture(scope="session")
def two_subjects(tmp_path_factory) -> Path:
    """2 subjects x 4 classes x 1 clip, 64 px, 8-9 frames: a 2-fold LOSO in seconds."""
    return _tiny_set(tmp_path_factory, "synth2", n_subjects=2, max_frames=9, seed=2)


def tiny_args(root: Path, cache: Path, **overrides) -> list[str]:
    """LightningCLI arguments for a CPU smoke run on ``tiny_synth`` (1 epoch, tiny widths)."""
    args = {
        "data.protocol": "synth_4cls", "data.data_root": str(root), "data.cache_dir": str(cache),
        "data.image_size": 32, "data.clip_len": 4, "data.clip_size": 24, "data.flow_size": 64,
        "data.flow_algorithm": "farneback", "data.batch_size": 4,
        "model.net.width_2d": 4, "model.net.width_3d": 4, "model.net.small_input_2d": "true",
        "trainer.max_epochs": 2, "trainer.accelerator": "cpu", "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false", "trainer.enable_checkpointing": "false",
        "trainer.num_sanity_val_steps": 0, "trainer.log_every_n_steps": 1, "seed_everything": 0,
    }
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def relabel(run_dir: Path, subject: str | None = None) -> None:
    """The leak tests' edit: labels shifted to the next class in a run's prediction files, checksums
    updated as the folds would have written them. ``subject=None``: every test subject's labels in
    the test files (``predictions*.csv``; the inner-validation files untouched). ``subject``: that
    subject's labels in every file where it appears, its own fold's test files and the other folds'
    inner-validation files alike."""
    import hashlib
    import json

    import pandas as pd

    files = ["predictions.csv", "predictions_epochs.csv"]
    files += ["val_predictions_epochs.csv"] if subject else []
    for fold_dir in sorted(Path(run_dir).glob("fold_*")):
        meta = json.loads((fold_dir / "metrics.json").read_text())
        for name in files:
            frame = pd.read_csv(fold_dir / name)
            rows = frame["subject"] == subject if subject else slice(None)
            frame.loc[rows, "y_true"] = (frame.loc[rows, "y_true"] + 1) % len(meta["class_names"])
            frame.to_csv(fold_dir / name, index=False)
        for name, key in (("predictions.csv", "predictions_sha256"), ("val_predictions_epochs.csv",
                                                                      "val_predictions_sha256")):
            if key in meta:
                meta[key] = hashlib.sha256((fold_dir / name).read_bytes()).hexdigest()
        (fold_dir / "metrics.json").write_text(json.dumps(meta))
