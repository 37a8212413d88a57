"""Fusion of the 2D (apex image) and 3D (clip) branches.

Implements two operators:
    * :func:`late_fusion` (default): score-level fusion as in FAMNet
      (arXiv 2508.13483), whose "late fusion module" merges the two branches'
      score vectors before the final softmax. Data flow::

          logits_a, logits_b -> softmax each -> w * p_a + (1 - w) * p_b -> log

      The exact operator is left open by the paper; a weighted mean of class
      probabilities is the common choice. We return its log so it can be fed to
      ``CrossEntropyLoss`` / ``argmax`` like ordinary logits.
    * :class:`FeatureFusion` (alternative): feature-level fusion. Data flow::

          feat_a, feat_b -> concat -> Linear -> ReLU -> Dropout -> Linear -> logits
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def late_fusion(logits_a: Tensor, logits_b: Tensor, weight: float = 0.5) -> Tensor:
    """Fuse two logit tensors as the log of the weighted mean of their softmaxes.

    ``out = log(weight * softmax(logits_a) + (1 - weight) * softmax(logits_b))``,
    computed stably with ``logsumexp`` in log space. ``out.exp()`` sums to 1 over
    the class dimension, so ``out`` is a valid log-probability vector; since
    ``log_softmax(out) == out``, ``F.cross_entropy(out, y)`` equals the NLL of the
    fused distribution, and gradients reach both branches.

    Args:
        logits_a: (B, C) logits of the first branch (the 2D branch in FAMNet).
        logits_b: (B, C) logits of the second branch (the 3D branch).
        weight: Weight of ``logits_a`` in [0, 1]; ``1 - weight`` goes to ``logits_b``.

    Returns:
        (B, C) fused log-probabilities, usable as logits.

    Raises:
        ValueError: If the shapes differ or ``weight`` is outside [0, 1].
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"late_fusion needs equal shapes, got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"late_fusion weight must be in [0, 1], got {weight}")
    # log(0) = -inf is fine: logsumexp ignores that term and its gradient is 0.
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1mw = math.log1p(-weight) if weight < 1 else -math.inf
    stacked = torch.stack(
        [F.log_softmax(logits_a, dim=-1) + log_w, F.log_softmax(logits_b, dim=-1) + log_1mw], dim=0
    )
    return torch.logsumexp(stacked, dim=0)


class FeatureFusion(nn.Module):
    """Concatenate two pooled feature vectors and classify them with a small MLP.

    Args:
        in_a: Feature size of the first branch.
        in_b: Feature size of the second branch.
        num_classes: Number of output classes.
        hidden: Hidden units of the MLP.
        dropout: Dropout probability after the hidden layer.
    """

    def __init__(self, in_a: int, in_b: int, num_classes: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_a + in_b, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, feat_a: Tensor, feat_b: Tensor) -> Tensor:
        """Return (B, num_classes) logits from (B, in_a) and (B, in_b) features."""
        return self.mlp(torch.cat([feat_a, feat_b], dim=1))
