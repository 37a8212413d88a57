"""``famnet-pl export MODEL_DIR --format onnx|torchscript``: the network alone, checked against the
eager model, with ``preprocess.json`` beside it.

Data flow::

    model.ckpt -> MERLitModule.net -> Exportable (inputs x2d[, x3d]; outputs probs, au_probs: the
        eager predict_step's, without test-time augmentation) -> adaptive average pools whose output
        does not divide their input replaced by the same averages as fixed matrices (ONNX has no such
        operator; the exporters refuse it) -> torch.jit.trace | torch.onnx.export
        -> MODEL_DIR/export_<format>/{model.pt | model.onnx, preprocess.json, io.json}
    parity: the exported file is run (torch.jit.load / onnxruntime) on random inputs of the
        preprocess.json shapes and compared with the eager module; above 1e-4 the export fails.

Inputs are made exactly as ``famnet-pl predict`` makes them (preprocess.json: views, sizes,
normalisation statistics). With ``tta: hflip`` there, run the model on the input and on its mirror
(flip W, negate the horizontal-flow channel before normalising) and average the probabilities.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from famnet_pl.data.views import flow_u_channels
from famnet_pl.deploy.bundle import PREPROCESS_JSON, load_bundle
from famnet_pl.models.module import MERLitModule
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json, replace_dir

TOLERANCE = 1e-4
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
#: What an export folder holds: an existing --out folder is replaced only if it holds nothing else.
EXPORT_FILES = {*FILES.values(), PREPROCESS_JSON, "io.json"}


class ExportError(RuntimeError):
    """The exported network does not reproduce the eager one (or the exporter failed)."""


class MatrixAvgPool(nn.Module):
    """Adaptive average pooling over the last ``len(output_size)`` dimensions as a product with fixed
    averaging matrices: the same windows as ``nn.AdaptiveAvgPool{2,3}d`` (start ``floor(i * n / m)``,
    end ``ceil((i + 1) * n / m)``), for exporters without adaptive pooling of non-divisible sizes."""

    def __init__(self, output_size: tuple[int | None, ...]) -> None:
        super().__init__()
        self.output_size = tuple(output_size)

    @staticmethod
    def _matrix(n: int, m: int, like: Tensor) -> Tensor:
        a = torch.zeros(m, n, dtype=like.dtype, device=like.device)
        for i in range(m):
            lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
            a[i, lo:hi] = 1.0 / (hi - lo)
        return a

    def forward(self, x: Tensor) -> Tensor:
        dims = len(self.output_size)
        for offset, m in enumerate(self.output_size):
            axis = x.dim() - dims + offset
            n = x.shape[axis]
            m = n if m is None else m
            # (..., n, ...) -> (..., m, ...): contract the axis with the (m, n) averaging matrix
            # (positive axes only: the ONNX exporter mistranslates negative ones in a transpose)
            last = x.dim() - 1
            x = (x.transpose(axis, last) @ self._matrix(int(n), int(m), x).T).transpose(axis, last)
        return x


def _export_friendly(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adaptive average pool replaced by :class:`MatrixAvgPool`."""
    import copy

    net = copy.deepcopy(net)
    for name, child in list(net.named_modules()):
        if isinstance(child, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
            size = child.output_size
            dims = 2 if isinstance(child, nn.AdaptiveAvgPool2d) else 3
            size = (size,) * dims if isinstance(size, int) else tuple(size)
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, MatrixAvgPool(size))
    return net


class Exportable(nn.Module):
    """The network with :meth:`MERLitModule.predict_step`'s outputs: class probabilities and (where an
    AU head was trained) AU probabilities averaged over the branches that have one."""

    def __init__(self, module: MERLitModule, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.inputs, self.trains_au = _export_friendly(module.net), inputs, module.trains_au

    def forward(self, *xs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(**dict(zip(self.inputs, xs)))
        probs = torch.softmax(out["emotion"].float(), dim=1)
        au = [torch.sigmoid(out[k].float()) for k in ("au_2d", "au_3d") if k in out and self.trains_au]
        au_probs = torch.stack(au).mean(0) if au else probs[:, :0]
        return probs, au_probs


def example_inputs(module: MERLitModule, pre, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Random inputs of the shapes preprocess.json makes, for the inputs the network reads."""
    views, g = pre.views, torch.Generator().manual_seed(seed)
    branches = getattr(module.net, "branches", "2d")
    shapes = {}
    if "2d" in branches:
        shapes["x2d"] = (batch, module.hparams.in_channels_2d, views["image_size"], views["image_size"])
    if "3d" in branches:
        shapes["x3d"] = (batch, 3, views["clip_len"], views["clip_size"], views["clip_size"])
    inputs = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    if module._takes_landmarks and views["face_detector"] != "none":  # FRL-DGT places its regions from them
        inputs["landmarks"] = 0.2 + 0.6 * torch.rand(batch, 5, 2, generator=g)
    return inputs


def _run_exported(path: Path, fmt: str, inputs: dict[str, Tensor]) -> list[np.ndarray]:
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return [t.numpy() for t in loaded(*inputs.values())]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def export_model(model_dir: str | Path, fmt: str, *, out: str | Path | None = None) -> tuple[Path, float]:
    """Export, check parity, and return the exported file and the largest output difference."""
    if fmt not in FILES:
        raise BadInput(f"--format {fmt}: one of {', '.join(FILES)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BadInput("--format onnx needs onnx, onnxscript and onnxruntime: pip install "
                           "'famnet_pl[export]'") from None
    module, pre = load_bundle(model_dir)
    inputs = example_inputs(module, pre)
    wrapper = Exportable(module, tuple(inputs)).eval()
    folder = (Path(out) if out else Path(model_dir) / f"export_{fmt}").resolve()
    if folder.exists() and (not folder.is_dir() or {p.name for p in folder.iterdir()} - EXPORT_FILES):
        raise BadInput(f"--out {out}: exists and holds other files than an export; give a new or empty "
                       "folder")
    staging = folder.with_name(f"{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        error = _export_and_check(module, pre, wrapper, inputs, fmt, staging / FILES[fmt])
        shutil.copy2(Path(model_dir) / PREPROCESS_JSON, staging / PREPROCESS_JSON)
        atomic_write_json(staging / "io.json", {
            "inputs": {k: ["batch", *v.shape[1:]] for k, v in inputs.items()},
            "outputs": {"probs": ["batch", len(pre.classes)],
                        "au_probs": ["batch", len(pre.au_vocab) if pre.trains_au else 0]},
            "classes": list(pre.classes), "au_vocab": list(pre.au_vocab) if pre.trains_au else [],
            "tta": pre.tta, "flow_u_channel": flow_u_channels(pre.input_2d, pre.clip_mode),
            "clip_mode": pre.clip_mode, "max_abs_error_vs_eager": error,
            "note": "inputs as famnet-pl predict makes them (preprocess.json); with tta hflip, also run "
                    "the input mirrored (flip W; negate flow_u_channel before normalising) and average "
                    "the probabilities"})
        replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left
        raise
    return folder / FILES[fmt], error


def _export_and_check(module: MERLitModule, pre, wrapper: Exportable, inputs: dict[str, Tensor], fmt: str,
                      path: Path) -> float:
    """Write the exported network to ``path``; the largest difference from the eager outputs."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns at every shape check of the network (constants in the graph: the shapes
            # are preprocess.json's); parity below is the check that matters.
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                torch.jit.trace(wrapper, tuple(inputs.values()), check_trace=False).save(str(path))
            else:
                torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs),
                                  output_names=["probs", "au_probs"], dynamo=False,
                                  dynamic_axes={k: {0: "batch"} for k in [*inputs, "probs", "au_probs"]})
    except Exception as exc:  # the exporters raise many types; one line says which and why
        raise ExportError(f"export {fmt}: the exporter failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    check = example_inputs(module, pre, batch=3, seed=1)  # another batch size: the batch axis is free
    with torch.no_grad():
        eager = [t.numpy() for t in wrapper(*check.values())]
        # the wrapper is predict_step without TTA (adaptive pools replaced): check that too
        reference = module.predict_step({**check, "index": torch.arange(3)}) if "x2d" in check else None
    exported = _run_exported(path, fmt, check)
    error = max(float(np.abs(a - b).max()) if a.size else 0.0 for a, b in zip(exported, eager))
    if reference is not None:
        error = max(error, float(np.abs(exported[0] - reference["probs"].numpy()).max()))
    if error > TOLERANCE:
        raise ExportError(f"export {fmt}: exported and eager outputs differ by {error:.2e} (> {TOLERANCE}); "
                          "nothing written")
    return error

