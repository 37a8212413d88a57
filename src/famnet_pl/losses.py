"""FAMNet's weighted multi-task loss.

    L = w2d * CE(emotion_2d) + w3d * CE(emotion_3d) + wfuse * CE(emotion_fused)
        + wau * (BCE(au_2d) + BCE(au_3d))

A model may add its own, already weighted, terms under ``outputs["aux_losses"]`` (FRL-DGT's
self-supervised displacement losses); they are summed into L.

Terms whose outputs a model does not produce (a 2D-only net has no ``emotion_3d``) are skipped, so
the same loss serves every branch setting. AU BCE is averaged over the *unmasked* (sample, AU)
entries only: samples whose AU cell is unknown (``?``), or AUs a dataset never codes, are not read
as "absent". Every weight is a config value so W&B sweeps can tune them
(``--model.loss_weights.wau=0.3``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LossWeights:
    """Weights of the multi-task loss terms (see module docstring)."""

    w2d: float = 1.0
    w3d: float = 1.0
    wfuse: float = 1.0
    wau: float = 0.5


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE-with-logits over entries where ``mask`` is 1 (0 when nothing is unmasked)."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * mask
    return losses.sum() / mask.sum().clamp_min(1.0)


class WeightedMultiTaskLoss(nn.Module):
    """Weighted sum of emotion cross-entropies and AU BCEs over whichever outputs are present.

    Args:
        weights: the term weights.
    """

    _EMOTION_TERMS = (("emotion_2d", "w2d"), ("emotion_3d", "w3d"), ("emotion_fused", "wfuse"))
    _AU_TERMS = ("au_2d", "au_3d")

    def __init__(self, weights: LossWeights = LossWeights()) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, outputs: dict[str, Tensor], label: Tensor, au: Tensor | None = None,
                au_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its parts: unweighted ``ce_2d``, ``ce_3d``, ``ce_fused``, ``bce_au``, plus
        any ``outputs["aux_losses"]`` terms (already weighted by the model)."""
        parts: dict[str, Tensor] = {}
        total = label.new_zeros((), dtype=torch.float32)
        for key, weight_name in self._EMOTION_TERMS:
            if key in outputs:
                name = "ce_" + key.split("_")[1]
                parts[name] = F.cross_entropy(outputs[key], label)
                total = total + getattr(self.weights, weight_name) * parts[name]
        au_keys = [k for k in self._AU_TERMS if k in outputs and outputs[k].shape[1] > 0]
        if au is not None and au_keys and self.weights.wau:
            mask = torch.ones_like(au) if au_mask is None else au_mask
            parts["bce_au"] = sum(masked_bce(outputs[k], au, mask) for k in au_keys)
            total = total + self.weights.wau * parts["bce_au"]
        # Model-specific self-supervised terms (FRL-DGT's displacement warp/smoothness), weighted by
        # the model's own options: added as they come, logged as parts.
        for name, value in outputs.get("aux_losses", {}).items():
            parts[name] = value
            total = total + value
        return total, parts
