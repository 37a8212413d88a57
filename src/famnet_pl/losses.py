"""The weighted multi-task loss of every registered model (FAMNet and the comparison models).

Data flow::

    outputs {"emotion_2d", "emotion_3d", "emotion_fused", "au_2d", "au_3d", "aux_losses": {name: term}}
      L = w2d * CE(emotion_2d) + w3d * CE(emotion_3d) + wfuse * CE(emotion_fused)
          + wau * (BCE(au_2d) + BCE(au_3d))
          + sum over aux_losses of  LossWeights.<name> * term
      -> (L, parts)

``aux_losses`` are a model's own self-supervised terms, returned *unweighted*: FRL-DGT's displacement
losses ``dgm_photo``, ``dgm_smooth``, ``dgm_flow``. Their weights are fields of :class:`LossWeights`
like the others, so one place (``model.loss_weights``) holds every weight and a W&B sweep over
``model.loss_weights.*`` reaches them all. A model computes only the aux terms whose weight is
non-zero (the LightningModule tells it which, see ``MERLitModule``): FRL-DGT's flow guidance off
costs nothing.

With ``class_weight`` set (``MERLitModule(balance="classes")``), every emotion cross-entropy weighs
class ``c`` by ``n / (C * n_c)`` of the fold's training labels, so each class counts as much as the
others in the loss, as it does in UF1 and UAR.

Terms whose outputs a model does not produce (a 2D-only net has no ``emotion_3d``) are skipped, so
the same loss serves every branch setting; a weight for a term the model lacks has no effect (the
``dgm_*`` weights on FAMNet). AU BCE is averaged over the *unmasked* (sample, AU) entries only:
samples whose AU cell is unknown (``?``), or AUs a dataset never codes, are not read as "absent".
Every weight is a config value so W&B sweeps can tune them (``--model.loss_weights.wau=0.3``).

The parts (logged as ``{stage}/loss_<name>``: ``ce_2d``, ``ce_3d``, ``ce_fused``, ``bce_au``,
``dgm_photo``, ``dgm_smooth``, ``dgm_flow``) are all *unweighted*: ``train/loss_dgm_smooth`` is the
smoothness term itself, not ``dgm_smooth`` times it (it was weighted before the weights moved here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LossWeights:
    """Weights of the multi-task loss terms (see module docstring); 0 switches a term off.

    Attributes:
        w2d: Cross-entropy of the 2D branch's emotion logits (``emotion_2d``).
        w3d: Cross-entropy of the 3D branch's emotion logits (``emotion_3d``).
        wfuse: Cross-entropy of the fused emotion logits (``emotion_fused``).
        wau: Masked BCE of the AU heads (``au_2d`` + ``au_3d``).
        dgm_photo: FRL-DGT's photometric warp loss: Charbonnier of ``warp(onset, d) - apex``.
        dgm_smooth: FRL-DGT's edge-aware first-order smoothness of the displacement ``d``.
        dgm_flow: FRL-DGT's guidance of ``d`` by the optical flow; only with the 9-channel view
            (``data.input_2d=pair_flow``), which has flow to guide by.
    """

    w2d: float = 1.0
    w3d: float = 1.0
    wfuse: float = 1.0
    wau: float = 0.5
    # FRL-DGT's self-supervised displacement terms (formerly net.dgm_photo_weight,
    # net.dgm_smooth_weight, net.flow_weight; same defaults, so unchanged configs train the same).
    dgm_photo: float = 1.0
    dgm_smooth: float = 0.1
    dgm_flow: float = 0.1

    def aux_weight(self, name: str) -> float:
        """Weight of the model aux term ``name`` (``outputs["aux_losses"]``): the field of that name.

        Raises:
            KeyError: If no field is named ``name`` (a model returning a term nothing weighs is a bug,
                not a term to drop silently).
        """
        if name not in _AUX_FIELDS:
            raise KeyError(f"aux loss term {name!r} has no weight among LossWeights' aux weights "
                           f"({', '.join(sorted(_AUX_FIELDS))}); a new term needs a LossWeights field "
                           "of its name")
        return getattr(self, name)


# Fields that weigh model aux terms: all but the emotion and AU weights.
_AUX_FIELDS = frozenset(f.name for f in dataclasses.fields(LossWeights)) - {"w2d", "w3d", "wfuse", "wau"}


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE-with-logits over entries where ``mask`` is 1 (0 when nothing is unmasked)."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * mask
    return losses.sum() / mask.sum().clamp_min(1.0)


class WeightedMultiTaskLoss(nn.Module):
    """Weighted sum of emotion cross-entropies, AU BCEs and model aux terms, over whichever are present.

    Args:
        weights: the term weights.
        label_smoothing: of every emotion cross-entropy (0: none; torch's ``label_smoothing``).
    """

    _EMOTION_TERMS = (("emotion_2d", "w2d"), ("emotion_3d", "w3d"), ("emotion_fused", "wfuse"))
    _AU_TERMS = ("au_2d", "au_3d")

    def __init__(self, weights: LossWeights = LossWeights(), label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weights, self.label_smoothing = weights, label_smoothing
        # Per-class weights of every emotion cross-entropy (class-balanced training); None: unweighted.
        # Not saved: the LightningModule sets them from the fold's training labels at every fit start.
        self.register_buffer("class_weight", None, persistent=False)

    def forward(self, outputs: dict[str, Tensor], label: Tensor, au: Tensor | None = None,
                au_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its *unweighted* parts: ``ce_2d``, ``ce_3d``, ``ce_fused``, ``bce_au`` and
        each ``outputs["aux_losses"]`` term whose weight is non-zero (``dgm_photo``, ...)."""
        parts: dict[str, Tensor] = {}
        total = label.new_zeros((), dtype=torch.float32)
        for key, weight_name in self._EMOTION_TERMS:
            if key in outputs:
                name = "ce_" + key.split("_")[1]
                parts[name] = F.cross_entropy(outputs[key], label, weight=self.class_weight,
                                              label_smoothing=self.label_smoothing)
                total = total + getattr(self.weights, weight_name) * parts[name]
        au_keys = [k for k in self._AU_TERMS if k in outputs and outputs[k].shape[1] > 0]
        if au is not None and au_keys and self.weights.wau:
            mask = torch.ones_like(au) if au_mask is None else au_mask
            parts["bce_au"] = sum(masked_bce(outputs[k], au, mask) for k in au_keys)
            total = total + self.weights.wau * parts["bce_au"]
        # Model-specific self-supervised terms (FRL-DGT's displacement warp/smoothness/flow), each
        # weighted by its LossWeights field. A zero-weight term is normally not computed at all (the
        # LightningModule tells the model which are active); one that comes anyway (a model used on
        # its own) is dropped, so the total never depends on where the term was switched off.
        for name, term in outputs.get("aux_losses", {}).items():
            weight = self.weights.aux_weight(name)
            if not weight:
                continue
            parts[name] = term
            total = total + weight * term
        return total, parts
