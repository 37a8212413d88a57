"""The model's inputs from a batch of cached arrays: conversion, augmentation, normalisation and
flip test-time augmentation, done on whatever device the batch is on.

Data flow::

    MERDataset batch (CPU): the cache's arrays as stored, one np.take per array (in the main
        process: MERLoader's workers send only the per-sample part)
        {"apex"/"onset": uint8 (B, S, S, 3), "flow": float32 (B, S, S, 3), "clip": uint8 or float32
         (B, T, s, s, 3), "aug2d"/"aug3d": drawn parameters (B, 6), ["tta"], label, au, ...}
    -> (pinned) transfer -> BatchViews(batch) on the device:
        2D: parts -> float (uint8 / 255) -> concatenated in VIEWS_2D order -> apply_clip
            -> (x - mean) / std -> x2d (B, C, S, S)
        3D: clip -> float -> apply_clip -> (x - mean) / std [-> minus frame 0: clip_mode=diff]
            -> x3d (B, 3, T, s, s)
        tta: the un-normalised views mirrored (flow u negated) and normalised -> x2d_flip, x3d_flip

MERDataModule.on_after_batch_transfer calls it for Lightning's loops; the LOSO callback and
``famnet-pl predict`` call it after moving their batches. Only ``(B,)`` parameters and the cache's
own bytes travel: a batch of full-size clips moves as uint8 (a quarter of float32), and no
per-sample float work is left on the CPU. In a CPU run this is the same code on the CPU, and every
value is the one the per-sample numpy path computed (same operations in the same precision).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from famnet_pl.data.transforms import PARAMS, apply_clip, hflip

# 2D views: the cached arrays stacked as channels, 3 each, RGB frames first (one source of truth for
# the channel count, the RGB slice and the flow u channel).
VIEWS_2D: dict[str, tuple[str, ...]] = {"apex": ("apex",), "flow": ("flow",), "both": ("apex", "flow"),
                                         "pair": ("onset", "apex"), "pair_flow": ("onset", "apex", "flow")}
INPUT_2D_CHANNELS = {name: 3 * len(parts) for name, parts in VIEWS_2D.items()}
#: Batch keys of the raw arrays (the cache's names), replaced by x2d / x3d.
RAW = ("onset", "apex", "flow", "clip")


def flow_u_channels(input_2d: str, clip_mode: str) -> dict[str, int | None]:
    """Channel of the horizontal flow component ``u`` in each view (None: the view holds no flow),
    which a horizontal flip negates: ``{"x2d": ..., "x3d": ...}``. Training augmentation and flip
    test-time augmentation both read it here."""
    parts = VIEWS_2D[input_2d]
    return {"x2d": 3 * parts.index("flow") if "flow" in parts else None,
            "x3d": 0 if clip_mode == "flow" else None}


def rgb_channels(input_2d: str, clip_mode: str) -> dict[str, slice | None]:
    """The channels brightness/contrast changes in each view (None: no RGB). The 2D view's RGB
    frames come first and share one draw (a brightness change between onset and apex would be fake
    motion)."""
    n_rgb = 3 * sum(name != "flow" for name in VIEWS_2D[input_2d])
    return {"x2d": slice(0, n_rgb) if n_rgb else None, "x3d": None if clip_mode == "flow" else slice(0, 3)}


def as_float(array: Tensor) -> Tensor:
    """A cached array in model units: uint8 frames to [0, 1], flow (float32, pixels) as it is."""
    return array.float() / 255.0 if array.dtype == torch.uint8 else array.float()


def raw_2d(parts, input_2d: str, rows=slice(None)) -> Tensor:
    """The un-normalised 2D view ``(..., S, S, C)`` float32 of ``rows`` of the cached parts (a
    batch's tensors, or the cache's arrays): each part in model units, stacked as channels in
    :data:`VIEWS_2D` order. The one definition for a sample, the normalisation statistics, a
    batch and the stacked folds."""
    return torch.cat([as_float(torch.as_tensor(parts[name][rows])) for name in VIEWS_2D[input_2d]], dim=-1)


def raw_3d(parts, rows=slice(None)) -> Tensor:
    """The un-normalised clip ``(..., T, s, s, 3)`` float32 of ``rows`` (RGB in [0, 1], or flow)."""
    return as_float(torch.as_tensor(parts["clip"][rows]))


class BatchViews:
    """Turn a batch of raw cached arrays into model inputs (module docstring).

    Args:
        input_2d: the 2D view (:data:`VIEWS_2D`).
        clip_mode: the 3D view: ``frames``, ``diff`` or ``flow``.
        stats: per-channel ``mean_2d``, ``std_2d`` (and ``mean_3d``, ``std_3d``) of the fold's
            training samples, float32.
    """

    def __init__(self, input_2d: str, clip_mode: str, stats: dict[str, np.ndarray]) -> None:
        self.input_2d, self.clip_mode = input_2d, clip_mode
        self.flow_u, self.rgb = flow_u_channels(input_2d, clip_mode), rgb_channels(input_2d, clip_mode)
        self.stats = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in stats.items()}
        self._on: dict[torch.device, dict[str, Tensor]] = {}

    def _stats(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self.stats.items()}
        return self._on[device]

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A new batch: the raw keys replaced by ``x2d`` and ``x3d`` (those whose arrays the batch
        carries: the views the model reads), and with ``tta`` the mirrored ``x2d_flip``/``x3d_flip``;
        a batch that holds them already is returned as it is."""
        if "x2d" in batch or "x3d" in batch or not any(k in batch for k in RAW):
            return batch
        out = {k: v for k, v in batch.items() if k not in (*RAW, "aug2d", "aug3d", "tta")}
        views = {}
        if all(name in batch for name in VIEWS_2D[self.input_2d]):  # absent: the model reads no 2D view
            views["x2d"] = raw_2d(batch, self.input_2d)[:, None]
        if "clip" in batch:
            views["x3d"] = raw_3d(batch)
        for key, drawn in (("x2d", "aug2d"), ("x3d", "aug3d")):
            if key in views and drawn in batch:
                params = dict(zip(PARAMS, batch[drawn].unbind(1)))
                views[key] = apply_clip(views[key], params, rgb=self.rgb[key], flow_u=self.flow_u[key])
        out |= self._normalise(views)
        if "tta" in batch and bool(batch["tta"].any()):  # the mirrored sample: the model averages both
            out |= {f"{k}_flip": v for k, v in
                    self._normalise({k: hflip(v, self.flow_u[k]) for k, v in views.items()}).items()}
        return out

    def _normalise(self, views: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(B, 1, S, S, C)`` / ``(B, T, s, s, 3)`` float views -> normalised channel-first tensors."""
        stats = self._stats(next(iter(views.values())).device)
        out = {}
        if "x2d" in views:
            out["x2d"] = ((views["x2d"][:, 0] - stats["mean_2d"]) / stats["std_2d"]).permute(0, 3, 1, 2) \
                .contiguous()
        if "x3d" in views:
            x3d = (views["x3d"] - stats["mean_3d"]) / stats["std_3d"]
            if self.clip_mode == "diff":
                x3d = x3d - x3d[:, :1]
            out["x3d"] = x3d.permute(0, 4, 1, 2, 3).contiguous()
        return out
