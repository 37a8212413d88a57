"""Recipes: the config files of a run, from a dataset, a model and the machine's size.

Data flow::

    (dataset, model, size)  --configs()-->  experiments/base.yaml
                                            experiments/size/<size>.yaml     view sizes, batch, precision
                                            experiments/data/<dataset>.yaml  dataset, protocol, its own sizes
                                            experiments/model/<model>_<size>.yaml, else <model>.yaml
                                            experiments/tuned/<dataset>/<model config>.yaml, if any

Later files win. A real dataset's config states no view sizes, so the size file sets them; the
synthetic sets state their own (the CPU demo), so they are the same on every machine. A model config
wins over both where it fixes an input size (STSTNet's 28 px). A model family with a recipe per size
has one file per size (``famnet_cpu.yaml`` for ``MODEL=famnet`` at ``size=cpu``); a name that already
is a file (``famnet_cpu``) is used as it is on every machine. A tuned file holds what inner
validation on that dataset chose for that model recipe (``tuned/casme2/famnet_cpu.yaml``: the
regularisation of the CASME II CPU recipe), so a dataset's choices never leak into another dataset's
run, the synthetic demo's included. It is keyed by the data config, whatever ``data.protocol``.

``size="auto"`` is ``gpu`` when an NVIDIA GPU answers ``nvidia-smi -L``, else ``cpu``. The Makefile
and ``famnet-pl ablation`` resolve their configs here (``python -m famnet_pl.recipes`` prints them),
so the rule lives in one place. Only the standard library is imported: the Makefile runs this
before every command.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from famnet_pl.utils.errors import BadInput

SIZES = ("cpu", "gpu")


class RecipeError(BadInput):
    """An unknown dataset, model or size: one line naming the choices (exit code 2)."""


def detect_size() -> str:
    """``gpu`` when ``nvidia-smi -L`` lists a GPU, else ``cpu`` (no torch import: it takes seconds)."""
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "gpu" if "GPU" in listing else "cpu"


def resolve_size(size: str) -> str:
    """``cpu`` or ``gpu``; ``auto`` (or empty) is :func:`detect_size`."""
    if size in ("", "auto"):
        return detect_size()
    if size not in SIZES:
        raise RecipeError(f"unknown SIZE={size}; choose one of: auto {' '.join(SIZES)}")
    return size


def _choices(folder: Path) -> str:
    return " ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def model_config(model: str, size: str, experiments: str | Path = "experiments") -> Path:
    """``model/<model>_<size>.yaml`` when that recipe exists, else ``model/<model>.yaml``."""
    folder = Path(experiments) / "model"
    for path in (folder / f"{model}_{size}.yaml", folder / f"{model}.yaml"):
        if path.is_file():
            return path
    raise RecipeError(f"unknown MODEL={model}; choose one of: {_choices(folder)}")


def configs(dataset: str, model: str, size: str = "auto",
            experiments: str | Path = "experiments") -> list[Path]:
    """The config files of a run, in the order they apply (module docstring)."""
    root, size = Path(experiments), resolve_size(size)
    data = root / "data" / f"{dataset}.yaml"
    if not data.is_file():
        raise RecipeError(f"unknown DATASET={dataset}; choose one of: {_choices(root / 'data')}")
    model_file = model_config(model, size, root)
    tuned = root / "tuned" / dataset / model_file.name
    return [root / "base.yaml", root / "size" / f"{size}.yaml", data, model_file,
            *([tuned] if tuned.is_file() else [])]


def main(argv: list[str] | None = None) -> int:
    """``python -m famnet_pl.recipes DATASET MODEL [SIZE]``: the ``--config`` arguments of that run
    (``--model-name``: the model config's name only, for the run's default experiment name)."""
    parser = argparse.ArgumentParser(prog="python -m famnet_pl.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("model")
    parser.add_argument("size", nargs="?", default="auto")
    parser.add_argument("--experiments", default="experiments")
    parser.add_argument("--model-name", action="store_true", help="print the model config's name only")
    args = parser.parse_args(argv)
    try:
        if args.model_name:
            print(model_config(args.model, resolve_size(args.size), args.experiments).stem)
            return 0
        print(" ".join(f"--config {path}" for path in configs(args.dataset, args.model, args.size,
                                                                args.experiments)))
    except RecipeError as exc:
        print(f"make: {exc}", file=sys.stderr)
        return 2
    if args.size == "gpu" and detect_size() == "cpu":
        print("make: SIZE=gpu on a machine without a GPU: the GPU recipe takes hours on a CPU; leave SIZE "
              "unset (auto) or set SIZE=cpu for the CPU recipe", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
