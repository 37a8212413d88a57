"""Fusion of the 2D (static view) and 3D (clip) branches of FAMNet.

FAMNet (arXiv 2508.13483) fuses the two branches' score vectors in a "late fusion module" before the
final softmax; the operator and its weighting are left open. :class:`BranchFusion` offers four modes
(``FAMNet(fusion=...)``). Data flow::

    late    logits_2d, logits_3d -> softmax each -> w * p_2d + (1 - w) * p_3d -> log     w: a number
    learned                         (as late)                                           w = sigmoid(a),
                                                                                        a trained
    gated   (as late, with a per-sample w = sigmoid(Linear(concat(feat_2d, feat_3d))))
    feature feat_2d, feat_3d -> concat -> Linear -> ReLU -> Dropout -> Linear -> logits

The weighted-mean modes return the *log* of the fused distribution, so it can be fed to
``CrossEntropyLoss`` / ``argmax`` like ordinary logits. ``late``'s ``w`` is a buffer: it is saved with
the weights, so the value chosen on inner validation (``MERLitModule(late_weight_from="val")``) is
the one a checkpoint predicts with. Only ``late`` with a validation-chosen weight can *guarantee*
(on the validation subjects) never to be worse than the better branch: its grid contains w = 0 and
w = 1, the branches alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FusionMode = Literal["late", "learned", "gated", "feature"]
FUSIONS: tuple[str, ...] = ("late", "learned", "gated", "feature")


def late_fusion(logits_a: Tensor, logits_b: Tensor, weight: float | Tensor = 0.5) -> Tensor:
    """Fuse two logit tensors as the log of the weighted mean of their softmaxes.

    ``out = log(weight * softmax(logits_a) + (1 - weight) * softmax(logits_b))``,
    computed stably with ``logsumexp`` in log space. ``out.exp()`` sums to 1 over
    the class dimension, so ``out`` is a valid log-probability vector; since
    ``log_softmax(out) == out``, ``F.cross_entropy(out, y)`` equals the NLL of the
    fused distribution, and gradients reach both branches.

    Args:
        logits_a: (B, C) logits of the first branch (the 2D branch in FAMNet).
        logits_b: (B, C) logits of the second branch (the 3D branch).
        weight: Weight of ``logits_a`` in [0, 1]: a number, a scalar tensor or a (B, 1) tensor
            (per-sample weights); ``1 - weight`` goes to ``logits_b``.

    Returns:
        (B, C) fused log-probabilities, usable as logits.

    Raises:
        ValueError: If the shapes differ or a number ``weight`` is outside [0, 1].
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"late_fusion needs equal shapes, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}")
    if not isinstance(weight, Tensor) and not 0.0 <= weight <= 1.0:
        raise ValueError(f"late_fusion weight must be in [0, 1], got {weight}")
    w = torch.as_tensor(weight, dtype=torch.float32, device=logits_a.device)
    # log(0) = -inf is fine here: logsumexp ignores that term (w = 0 or 1 is one branch alone).
    return _mix(logits_a, logits_b, torch.log(w), torch.log1p(-w))


def _mix(logits_a: Tensor, logits_b: Tensor, log_w: Tensor, log_1mw: Tensor) -> Tensor:
    """``log(w * softmax(a) + (1 - w) * softmax(b))`` from the log-weights, in float32."""
    stacked = torch.stack([F.log_softmax(logits_a.float(), dim=-1) + log_w,
                           F.log_softmax(logits_b.float(), dim=-1) + log_1mw], dim=0)
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

    def __init__(self, in_a: int, in_b: int, num_classes: int, hidden: int = 128,
                 dropout: float = 0.0) -> None:
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


class BranchFusion(nn.Module):
    """The fused emotion logits of FAMNet's two branches (modes: module docstring).

    Args:
        mode: ``late``, ``learned``, ``gated`` or ``feature``.
        features_2d: Pooled feature size of the 2D branch.
        features_3d: Pooled feature size of the 3D branch.
        num_classes: Emotion classes.
        late_weight: ``late``: weight of the 2D branch; ``learned``: its initial value.
        hidden: Hidden units of the ``feature`` MLP.
        dropout: Dropout inside the ``feature`` MLP.

    Raises:
        ValueError: On an unknown mode or ``late_weight`` outside [0, 1] (``learned``: (0, 1)).
    """

    def __init__(self, mode: FusionMode, *, features_2d: int, features_3d: int, num_classes: int,
                 late_weight: float = 0.5, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {mode!r}")
        if not 0.0 <= late_weight <= 1.0 or (mode == "learned" and late_weight in (0.0, 1.0)):
            raise ValueError(f"late_weight must be in [0, 1] ((0, 1) for fusion=learned), got {late_weight}")
        self.mode = mode
        self.register_buffer("late_weight", torch.tensor(float(late_weight)))
        if mode == "learned":
            self.weight_logit = nn.Parameter(torch.logit(torch.tensor(float(late_weight))))
        elif mode == "gated":
            # Starts at w = late_weight for every sample (zero weights, bias at the logit).
            self.gate = nn.Linear(features_2d + features_3d, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias,
                              torch.logit(torch.tensor(min(max(late_weight, 1e-3), 1 - 1e-3))).item())
        elif mode == "feature":
            self.feature = FeatureFusion(features_2d, features_3d, num_classes, hidden=hidden,
                                         dropout=dropout)

    def weight_logit_2d(self, feat_2d: Tensor, feat_3d: Tensor) -> Tensor:
        """``learned`` / ``gated``: logit of the 2D branch's weight (a scalar, or (B, 1) for ``gated``),
        in float32 even under autocast (a bf16 sigmoid reaches exactly 1 at logit ~6)."""
        if self.mode == "learned":
            return self.weight_logit.float()
        with torch.autocast(device_type=feat_2d.device.type, enabled=False):
            return self.gate(torch.cat([feat_2d, feat_3d], dim=1).float())

    def forward(self, logits_2d: Tensor, logits_3d: Tensor, feat_2d: Tensor, feat_3d: Tensor) -> Tensor:
        """(B, num_classes) fused logits (log-probabilities for the weighted-mean modes)."""
        if self.mode == "feature":
            return self.feature(feat_2d, feat_3d)
        if self.mode == "late":
            return late_fusion(logits_2d, logits_3d, self.late_weight)
        # log(sigmoid(a)) and log(1 - sigmoid(a)) straight from the logit: finite gradients even where
        # the sigmoid saturates to exactly 0 or 1 (log(w) there would give 0 * inf = NaN).
        a = self.weight_logit_2d(feat_2d, feat_3d)
        return _mix(logits_2d, logits_3d, F.logsigmoid(a), F.logsigmoid(-a))
