"""FRL-DGT: adaptive displacement generation + three-stage transformer fusion (pure ``nn.Module`` s).

Implements the network of FRL-DGT (Zhai et al., CVPR 2023, arXiv 2304.04420, "Feature
Representation Learning with Adaptive Displacement Generation and Transformer Fusion for
Micro-Expression Recognition"). There is no public code and the paper gives few sizes, so this is a
reconstruction from its description; every unknown is a keyword option of :class:`FRLDGT`.

Data flow::

    x2d (B, 6|9, H, W) = onset RGB | apex RGB | [flow u, v, strain]
      onset, apex --DisplacementGenerator (siamese U-Net + cost volumes)--> d (B, 2, H, W), pixels
                  self-supervised, unweighted -> outputs["aux_losses"]:
                    dgm_photo  = Charbonnier(warp(onset, d) - apex)
                    dgm_smooth = edge-aware |grad d|
                    [dgm_flow  = correlation of d with -flow, when the flow channels are given]
                  (weighted by model.loss_weights.dgm_* in the loss, famnet_pl/losses.py)
      [d, apex - onset, ...] --conv stem--> patch tokens (B, D, H/p, W/p) + 2D sin-cos positions
      (a) local fusion:  6 AU regions (brows L/R, eyes L/R, nose, mouth), boxes from 5 landmarks or
                         a template; RoIAlign-style r x r tokens per region -> transformer per region
                         group (brows, eyes, nose, mouth) -> mean -> 1 token per region
      (b) global fusion: transformer over the 6 region tokens (+ region-type embeddings)
      (c) full-face:     transformer over [CLS, 6 region tokens, all patch tokens] -> LayerNorm(CLS)
      -> MultiTaskHead -> emotion (B, num_classes) [, au (B, num_aus)]

What the paper fixes, what it leaves open, and what we chose (and why):

* **DGM input/output** -- the paper: a convolutional Displacement Generation Module takes the onset
  and apex frames and outputs a displacement map, trained self-supervised and jointly with the
  recogniser. Ours: a small U-Net (``dgm_width`` base channels, ``dgm_levels`` stride-2 levels, skip
  connections, LeakyReLU(0.1), He init, no normalisation layers -- as in unsupervised optical-flow
  nets, whose outputs must not depend on batch statistics). Its encoder is siamese (onset and apex
  encoded by the same weights) and every decoder level also reads a local cosine cost volume
  (radius ``dgm_corr_radius``, as in FlowNetC/PWC-Net): a plain U-Net on stacked frames stayed near
  zero displacement for hundreds of steps in our tests, with the cost volume it learns sub-pixel
  shifts in ~150 steps. The last conv is initialised near zero, so an untrained DGM is (almost) the
  identity warp.
* **Displacement convention** -- ``d`` is in pixels of the input, channel 0 = dx (right), 1 = dy
  (down), defined by *backward* warping: ``warp(onset, d)(p) = onset(p + d(p)) ~= apex(p)``. So for a
  TV-L1 onset->apex flow ``u`` (``apex(p + u) = onset(p)``), ``d ~= -u``.
* **warp** -- ``grid_sample`` (bilinear) with ``align_corners=True`` (pixel i of n sits at
  normalised ``2 i / (n - 1) - 1``, so integer displacements move whole pixels exactly) and
  ``padding_mode="border"`` (samples outside the face repeat the edge instead of pulling in black).
* **Self-supervised loss** (unspecified): photometric Charbonnier ``sqrt(e^2 + 1e-6)`` (robust like L1,
  smooth at 0) between ``warp(onset, d)`` and apex; first-order smoothness ``|dx d| + |dy d|``, weighted
  by ``exp(-dgm_edge_alpha * |grad apex|)`` (edge-aware: motion may change at the brow or lip edge;
  ``dgm_edge_alpha=0`` = plain); optional flow guidance with the 9-channel view. The network returns
  the terms unweighted; their weights are loss weights (``model.loss_weights.dgm_photo``,
  ``dgm_smooth``, ``dgm_flow``, in :class:`famnet_pl.losses.LossWeights`), so one place holds every
  weight and a sweep over ``model.loss_weights.*`` reaches them. Only the terms named in
  :attr:`FRLDGT.active_aux_losses` are computed (the LightningModule names those with a non-zero
  weight): a term switched off costs nothing.
  Our data standardises each flow channel (mean/std over the training set), so pixels are lost: the
  default guidance is scale-free, ``1 - Pearson(d_c, -flow_c)`` per sample and axis (invariant to any
  per-channel affine normalisation); with ``flow_scale`` (pixels per flow unit) it is a Charbonnier
  distance ``|d + flow_scale * flow|`` instead.
* **joint / frozen** -- ``dgm_mode="joint"``: the DGM gets gradients from the classifier *and* from
  its self-supervised terms (``aux_losses``), as in the paper's end-to-end training. ``"frozen"``:
  its parameters get ``requires_grad=False`` and it runs under ``no_grad`` (e.g. after
  :func:`pretrain_displacement`); its losses are still reported, detached, for monitoring.
* **Token inputs** (``token_inputs``) -- the paper fuses the DGM's displacement with dynamic features
  of the onset/apex pair. Default ``("displacement", "difference")``: motion only. The apex frame
  carries identity more than expression (our synthetic data: apex alone is at chance), so
  ``"apex"`` is opt-in; ``"flow"`` (the u, v, strain channels) is opt-in for the 9-channel view.
* **Patch tokens** -- a conv stem (3x3 conv -> BN -> GELU at full resolution, then a ``patch_size``
  stride conv to ``embed_dim``); fixed 2D sin-cos positions (MAE) work at any grid without parameters.
  H, W need not be multiples of ``patch_size`` (edge-padded).
* **AU regions** (the paper crops AU regions from facial landmarks; which and how large is not
  given): 6 boxes -- left/right brow (AU1, 2, 4), left/right eye (AU5, 6, 7), nose (AU9, 10), mouth
  and chin (AU12, 14, 15, 17, 25, 26) -- placed from 5 landmarks (MTCNN order: image-left eye,
  image-right eye, nose tip, image-left mouth corner, image-right mouth corner; xy normalised to
  [0, 1]) in units of the inter-ocular distance (see :func:`region_boxes`). With a face detector
  the data carries the detector's five landmarks through the crop, alignment, cache and
  augmentation into ``batch["landmarks"]`` (``data/face.py`` ``crop_landmarks``, ``data/preprocess.py``);
  without landmarks (aligned face crops, the synthetic set; or a sample whose face was not found:
  NaN) the template :data:`TEMPLATE_LANDMARKS` is used: eyes (0.36, 0.45) and
  (0.64, 0.45), nose (0.50, 0.60), mouth corners (0.39, 0.73) and (0.61, 0.73) -- between an
  MTCNN face box grown by our 15 % margin (eyes at ~0.42 of the height, estimated) and the
  synthetic faces (eyes at ~0.48).
  Boxes are in normalised coordinates, so they fit any H, W. Each region is read as an
  ``region_grid`` x ``region_grid`` grid of bilinearly averaged token samples (RoIAlign, 2x2 samples per
  bin), so every region has the same token count whatever the box size.
* **Local encoders** -- one per region *group* (brows, eyes, nose, mouth; left and right share) by
  default, ``share_local=True`` uses one for all; region token = mean of the encoded grid tokens.
* **Transformer layers** -- pre-norm ``nn.TransformerEncoderLayer`` (GELU, ``mlp_ratio``). The
  paper's own attention variant ("Fu-B-Attn", a linear fusion before attention) is not reproduced:
  we did not have its exact definition. Depth 0 for a stage makes it the identity (ablations).
* **Sizes** -- the paper's sizes are not given; defaults (embed 64, 4 heads, depth 1 per stage,
  patch 4, stem 16, DGM width 8 / 3 levels / radius 2: ~0.44 M parameters, half of them in the
  DGM) are a CPU demo at 48 px (forward + backward of a 16 x 9 x 48 x 48 batch: ~0.15 s on one
  thread). At 112 / 224 px use ``patch_size`` 8 / 16: the full-face stage attends over all
  ``(H / p) * (W / p)`` patch tokens.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from famnet_pl.models.components.heads import MultiTaskHead

log = logging.getLogger(__name__)

# Photometric/flow robust penalty: sqrt(x^2 + eps^2), ~|x| beyond eps (images are standardised).
_CHARBONNIER_EPS = 1e-3
# x2d channel layout (the data's pair / pair_flow views).
_ONSET, _APEX, _FLOW = slice(0, 3), slice(3, 6), slice(6, 9)

#: Five-point face template for aligned crops, MTCNN order, (x, y) normalised to [0, 1].
TEMPLATE_LANDMARKS: tuple[tuple[float, float], ...] = (
    (0.36, 0.45),  # image-left eye
    (0.64, 0.45),  # image-right eye
    (0.50, 0.60),  # nose tip
    (0.39, 0.73),  # image-left mouth corner
    (0.61, 0.73),  # image-right mouth corner
)
#: AU regions in token order, and the group (shared local encoder) of each.
REGION_NAMES: tuple[str, ...] = ("brow_l", "brow_r", "eye_l", "eye_r", "nose", "mouth")
REGION_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3), (4,), (5,))
TOKEN_INPUTS: dict[str, int] = {"displacement": 2, "difference": 3, "apex": 3, "flow": 3}
#: The DGM's self-supervised terms, in the order they are computed and summed; each name is also the
#: field of famnet_pl.losses.LossWeights that weighs it.
DISPLACEMENT_LOSSES: tuple[str, ...] = ("dgm_photo", "dgm_smooth", "dgm_flow")
#: Weights of :func:`pretrain_displacement` when none are given (the flow guidance off).
_PRETRAIN_WEIGHTS: dict[str, float] = {"dgm_photo": 1.0, "dgm_smooth": 0.1, "dgm_flow": 0.0}


# --------------------------------------------------------------------------------------------------
# Warping and the displacement losses
# --------------------------------------------------------------------------------------------------


def warp(image: Tensor, displacement: Tensor, *, padding_mode: str = "border") -> Tensor:
    """Backward-warp ``image`` by a dense displacement: ``out(p) = image(p + displacement(p))``.

    Bilinear ``grid_sample`` with ``align_corners=True``: pixel ``i`` of ``n`` maps to the normalised
    coordinate ``2 i / (n - 1) - 1``, so a displacement of ``k`` pixels reads exactly ``k`` pixels away
    (an integer displacement equals ``torch.roll`` away from the border).

    Args:
        image: (B, C, H, W).
        displacement: (B, 2, H, W) in pixels; channel 0 = dx (towards +x), 1 = dy (towards +y).
        padding_mode: ``grid_sample`` padding for samples outside the image; ``"border"`` repeats
            the edge pixels.

    Returns:
        The warped image, (B, C, H, W).
    """
    if displacement.shape[1] != 2 or displacement.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"displacement must be (B, 2, {image.shape[-2]}, {image.shape[-1]}), "
                         f"got {tuple(displacement.shape)}")
    _, _, h, w = image.shape
    ys = torch.arange(h, device=image.device, dtype=displacement.dtype)
    xs = torch.arange(w, device=image.device, dtype=displacement.dtype)
    x = xs.view(1, 1, w) + displacement[:, 0]
    y = ys.view(1, h, 1) + displacement[:, 1]
    grid = torch.stack((2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1), dim=-1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


def _charbonnier(x: Tensor) -> Tensor:
    """Mean robust penalty ``sqrt(x^2 + eps^2)``."""
    return torch.sqrt(x * x + _CHARBONNIER_EPS**2).mean()


def _pearson_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over (batch, channel) of ``1 - Pearson correlation`` over pixels; in [0, 2]."""
    pred = pred.flatten(2) - pred.flatten(2).mean(-1, keepdim=True)
    target = target.flatten(2) - target.flatten(2).mean(-1, keepdim=True)
    corr = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1) + 1e-6)
    return (1 - corr).mean()


def displacement_losses(
    onset: Tensor,
    apex: Tensor,
    displacement: Tensor,
    *,
    flow: Tensor | None = None,
    terms: Collection[str] = DISPLACEMENT_LOSSES,
    edge_alpha: float = 1.0,
    flow_scale: float | None = None,
) -> dict[str, Tensor]:
    """The DGM's self-supervised loss terms, *unweighted* (the caller weighs them: the training loss
    with ``model.loss_weights.dgm_*``, :func:`pretrain_displacement` with its ``weights``).

    Args:
        onset: (B, C, H, W) onset frames.
        apex: (B, C, H, W) apex frames.
        displacement: (B, 2, H, W) predicted displacement (pixels, see :func:`warp`).
        flow: Optional (B, 2, H, W) onset->apex optical flow (u, v) to guide ``displacement``.
        terms: The terms to compute, from :data:`DISPLACEMENT_LOSSES`: ``dgm_photo`` (Charbonnier
            error between ``warp(onset, d)`` and ``apex``), ``dgm_smooth`` (first-order smoothness
            ``|d/dx d| + |d/dy d|``), ``dgm_flow`` (guidance by ``flow``; skipped when ``flow`` is
            None). Terms not named are not computed.
        edge_alpha: Edge-aware smoothness: differences are weighted by
            ``exp(-edge_alpha * mean_c |grad apex|)``; 0 = uniform.
        flow_scale: None: guidance ``1 - Pearson(d, -flow)`` per sample and axis (scale-free, for
            standardised flow channels); a number: Charbonnier of ``d + flow_scale * flow``
            (``flow_scale`` = pixels per flow unit).

    Returns:
        ``{"dgm_photo", "dgm_smooth"[, "dgm_flow"]}`` (those asked for) -> unweighted scalar tensors,
        in that order.

    Raises:
        ValueError: If ``terms`` names a term not in :data:`DISPLACEMENT_LOSSES`.
    """
    unknown = set(terms) - set(DISPLACEMENT_LOSSES)
    if unknown:
        raise ValueError(f"unknown displacement loss terms {sorted(unknown)}; "
                         f"known: {list(DISPLACEMENT_LOSSES)}")
    losses: dict[str, Tensor] = {}
    if "dgm_photo" in terms:
        losses["dgm_photo"] = _charbonnier(warp(onset, displacement) - apex)
    if "dgm_smooth" in terms:
        ddx = (displacement[..., :, 1:] - displacement[..., :, :-1]).abs()
        ddy = (displacement[..., 1:, :] - displacement[..., :-1, :]).abs()
        wx = torch.exp(-edge_alpha * (apex[..., :, 1:] - apex[..., :, :-1]).abs().mean(1, keepdim=True))
        wy = torch.exp(-edge_alpha * (apex[..., 1:, :] - apex[..., :-1, :]).abs().mean(1, keepdim=True))
        losses["dgm_smooth"] = (ddx * wx).mean() + (ddy * wy).mean()
    if "dgm_flow" in terms and flow is not None:
        if flow_scale is None:
            losses["dgm_flow"] = _pearson_loss(displacement, -flow)
        else:
            losses["dgm_flow"] = _charbonnier(displacement + flow_scale * flow)
    return losses


# --------------------------------------------------------------------------------------------------
# Displacement Generation Module
# --------------------------------------------------------------------------------------------------


def _conv_block(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convs with LeakyReLU(0.1); the first may stride."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
    )


def local_correlation(a: Tensor, b: Tensor, radius: int) -> Tensor:
    """Local cost volume of cosine similarities: ``cost[:, k](p) = cos(a(p), b(p + delta_k))``.

    Args:
        a: (B, C, H, W) features of the apex frame.
        b: (B, C, H, W) features of the onset frame (edge-padded by ``radius``).
        radius: Largest offset per axis; ``(2 radius + 1)**2`` offsets, ``dy`` outer, ``dx`` inner.

    Returns:
        (B, (2 radius + 1)**2, H, W), LeakyReLU(0.1)-activated as in PWC-Net.
    """
    h, w = a.shape[-2:]
    r = radius
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    padded = F.pad(b, (r, r, r, r), mode="replicate")
    costs = [(a * padded[..., r + dy:r + dy + h, r + dx:r + dx + w]).sum(dim=1)
             for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return F.leaky_relu(torch.stack(costs, dim=1), 0.1)


class DisplacementGenerator(nn.Module):
    """Siamese U-Net with local cost volumes: (onset, apex) -> dense displacement field (pixels).

    Data flow::

        onset, apex -> shared encoder [enc_0 (full res), enc_1 (/2), ..., enc_L (/2^L)]
        level L..0: [corr(apex_i, onset_i), apex_i, upsampled decoder output] -> conv block
        -> 3x3 conv -> d (B, 2, H, W)

    The cost volume at each level (a FlowNetC/PWC-Net correlation, not in the FRL-DGT paper, which
    only calls the DGM convolutional) makes matching explicit: with it the generator learns to
    estimate motion within a few hundred steps, where a plain U-Net on stacked frames stalls near
    zero displacement. Level ``i`` sees offsets up to ``corr_radius * 2**i`` pixels. Inputs whose
    H, W are not multiples of ``2**levels`` are edge-padded and the output cropped.

    Args:
        in_channels: Channels of each frame (3 for RGB).
        width: Encoder channels at full resolution; level ``i`` has ``width * 2**i``.
        levels: Number of stride-2 levels.
        corr_radius: Cost-volume radius per level (0 disables the cost volumes).
    """

    def __init__(self, *, in_channels: int = 3, width: int = 8, levels: int = 3,
                 corr_radius: int = 2) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or levels < 1 or corr_radius < 0:
            raise ValueError("need in_channels, width, levels >= 1 and corr_radius >= 0, got "
                             f"{in_channels}, {width}, {levels}, {corr_radius}")
        self.levels = levels
        self.corr_radius = corr_radius
        chans = [width * 2**i for i in range(levels + 1)]
        n_corr = (2 * corr_radius + 1) ** 2 if corr_radius else 0
        self.encoders = nn.ModuleList([_conv_block(in_channels, chans[0])])
        self.encoders.extend(_conv_block(chans[i - 1], chans[i], stride=2) for i in range(1, levels + 1))
        self.decoders = nn.ModuleList(
            _conv_block(n_corr + chans[i] + (chans[i + 1] if i < levels else 0), chans[i])
            for i in reversed(range(levels + 1))
        )
        self.out = nn.Conv2d(chans[0], 2, 3, padding=1)
        # He init for LeakyReLU: PyTorch's default conv init shrinks activations ~6x per layer, which
        # over this unnormalised ~16-conv path leaves the output layer almost no signal to learn from.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        # Near-zero output layer: an untrained generator is (almost) the identity warp.
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, onset: Tensor, apex: Tensor) -> Tensor:
        """Return the displacement (B, 2, H, W) with ``warp(onset, d) ~= apex``."""
        b = onset.shape[0]
        h, w = onset.shape[-2:]
        mult = 2**self.levels
        pad = (0, (-w) % mult, 0, (-h) % mult)
        x = torch.cat([onset, apex], dim=0)  # one encoder pass for both frames
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        feats = []
        for enc in self.encoders:
            x = enc(x)
            feats.append(x)
        y: Tensor | None = None
        for dec, level in zip(self.decoders, reversed(range(self.levels + 1))):
            f_onset, f_apex = feats[level][:b], feats[level][b:]
            parts = [f_apex]
            if self.corr_radius:
                parts.insert(0, local_correlation(f_apex, f_onset, self.corr_radius))
            if y is not None:
                parts.append(F.interpolate(y, size=f_apex.shape[-2:], mode="bilinear", align_corners=False))
            y = dec(torch.cat(parts, dim=1))
        return self.out(y)[..., :h, :w]


def load_displacement_weights(generator: DisplacementGenerator, path: str | Path) -> None:
    """Load a :class:`DisplacementGenerator` ``state_dict`` saved with ``torch.save``.

    Args:
        generator: The module to fill (its ``width``/``levels`` must match the file's).
        path: Local file holding ``generator.state_dict()``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a state_dict that fits ``generator`` (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dgm_weights file not found: {path}. Save one with "
                                "torch.save(DisplacementGenerator(...).state_dict(), path), e.g. after "
                                "pretrain_displacement(), or pass dgm_weights=None")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"dgm_weights file {path} does not hold a state_dict (got {type(state).__name__})")
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"dgm_weights file {path} does not fit this DisplacementGenerator "
                         f"(check dgm_width / dgm_levels): {err}") from err
    log.info("DisplacementGenerator: loaded %d tensors from %s", len(state), path)


def pretrain_displacement(
    generator: DisplacementGenerator,
    onset: Tensor,
    apex: Tensor,
    *,
    flow: Tensor | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 16,
    weights: Mapping[str, float] | None = None,
    edge_alpha: float = 1.0,
    flow_scale: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Pre-train a generator on (onset, apex) pairs with its self-supervised loss (Adam).

    Args:
        generator: The DGM to train in place (its parameters must require grad).
        onset: (N, C, H, W) onset frames.
        apex: (N, C, H, W) apex frames.
        flow: Optional (N, 2, H, W) onset->apex flow for the guidance term.
        steps: Optimiser steps.
        lr: Adam learning rate.
        batch_size: Pairs per step, drawn at random (seeded) from the N pairs.
        weights: Term name (:data:`DISPLACEMENT_LOSSES`) -> weight; a term missing or weighted 0 is
            not computed. The LightningModule passes ``model.loss_weights.dgm_*``, the weights of
            the joint training. None: ``dgm_photo`` 1.0, ``dgm_smooth`` 0.1, no flow guidance.
        edge_alpha: See :func:`displacement_losses`.
        flow_scale: See :func:`displacement_losses`.
        seed: Seed of the minibatch sampling.

    Returns:
        The total loss of every step.
    """
    if onset.shape != apex.shape:
        raise ValueError(f"onset and apex shapes differ: {tuple(onset.shape)} vs {tuple(apex.shape)}")
    weights = dict(_PRETRAIN_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(DISPLACEMENT_LOSSES)
    if unknown:
        raise ValueError(f"unknown displacement loss terms {sorted(unknown)}; "
                         f"known: {list(DISPLACEMENT_LOSSES)}")
    # Zero-weight terms are not computed (as in the joint training).
    active = [name for name in DISPLACEMENT_LOSSES if weights.get(name)]
    was_training = generator.training
    generator.train()
    opt = torch.optim.Adam(generator.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    n = onset.shape[0]
    history = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=rng)[:batch_size].to(onset.device)
        d = generator(onset[idx], apex[idx])
        terms = displacement_losses(onset[idx], apex[idx], d, flow=None if flow is None else flow[idx],
                                    terms=active, edge_alpha=edge_alpha, flow_scale=flow_scale)
        # weight * term, summed in DISPLACEMENT_LOSSES order: the same sum as the training loss's.
        loss = sum(weights[name] * term for name, term in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
    generator.train(was_training)
    return history


# --------------------------------------------------------------------------------------------------
# Regions and token helpers
# --------------------------------------------------------------------------------------------------


def region_boxes(landmarks: Tensor) -> Tensor:
    """AU region boxes from 5 facial landmarks, in normalised image coordinates.

    With ``d`` the inter-ocular distance (all sizes in units of ``d``)::

        brow_l/r: centre = eye + (0, -0.40), size 0.80 x 0.45
        eye_l/r:  centre = eye,              size 0.80 x 0.40
        nose:     x = nose +- 0.40,  y from eye_mid + 0.15 to nose + 0.15
        mouth:    x from mouth_l - 0.25 to mouth_r + 0.25,  y from mouth_mid - 0.35 to + 0.45 (chin)

    Boxes are axis-aligned (aligned crops have little roll), clipped to [0, 1] and at least 1e-3 wide.

    Args:
        landmarks: (B, 5, 2) xy in [0, 1], MTCNN order (image-left eye, image-right eye, nose tip,
            image-left mouth corner, image-right mouth corner).

    Returns:
        (B, 6, 4) boxes ``(x0, y0, x1, y1)`` in :data:`REGION_NAMES` order.
    """
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be (B, 5, 2) normalised xy, got {tuple(landmarks.shape)}")
    eye_l, eye_r, nose, mouth_l, mouth_r = landmarks.unbind(1)  # (B, 2) each
    d = (eye_r - eye_l).norm(dim=-1).clamp_min(1e-3)  # (B,)

    def centred(c: Tensor, w: Tensor, h: Tensor) -> Tensor:
        return torch.stack([c[:, 0] - w / 2, c[:, 1] - h / 2, c[:, 0] + w / 2, c[:, 1] + h / 2], dim=-1)

    up = torch.stack([torch.zeros_like(d), -0.40 * d], dim=-1)
    eye_mid_y = (eye_l[:, 1] + eye_r[:, 1]) / 2
    mouth_mid_y = (mouth_l[:, 1] + mouth_r[:, 1]) / 2
    boxes = torch.stack([
        centred(eye_l + up, 0.80 * d, 0.45 * d),
        centred(eye_r + up, 0.80 * d, 0.45 * d),
        centred(eye_l, 0.80 * d, 0.40 * d),
        centred(eye_r, 0.80 * d, 0.40 * d),
        torch.stack([nose[:, 0] - 0.40 * d, eye_mid_y + 0.15 * d,
                     nose[:, 0] + 0.40 * d, nose[:, 1] + 0.15 * d], -1),
        torch.stack([mouth_l[:, 0] - 0.25 * d, mouth_mid_y - 0.35 * d, mouth_r[:, 0] + 0.25 * d,
                     mouth_mid_y + 0.45 * d], -1),
    ], dim=1)
    x0y0 = boxes[..., :2].clamp(0.0, 1.0 - 1e-3)
    x1y1 = torch.maximum(boxes[..., 2:].clamp(0.0, 1.0), x0y0 + 1e-3)
    return torch.cat([x0y0, x1y1], dim=-1)


def roi_tokens(fmap: Tensor, boxes: Tensor, grid: int, *, extent: tuple[float, float] = (1.0, 1.0),
               samples: int = 2) -> Tensor:
    """RoIAlign-style sampling: ``grid x grid`` bilinearly averaged feature vectors per box.

    Args:
        fmap: (B, D, Gh, Gw) feature map covering the (padded) image.
        boxes: (B, R, 4) ``(x0, y0, x1, y1)`` in normalised coordinates of the *unpadded* image.
        grid: Output bins per side.
        extent: (fraction of the map's height, width) covered by the unpadded image.
        samples: Bilinear samples per bin side, averaged.

    Returns:
        (B, R, grid * grid, D), bins in row-major order.
    """
    b, dim = fmap.shape[:2]
    r = boxes.shape[1]
    n = grid * samples
    steps = (torch.arange(n, device=fmap.device, dtype=fmap.dtype) + 0.5) / n
    x0, y0, x1, y1 = boxes.to(fmap.dtype).unbind(-1)  # (B, R)
    xs = (x0[..., None] + (x1 - x0)[..., None] * steps) * extent[1]  # (B, R, n)
    ys = (y0[..., None] + (y1 - y0)[..., None] * steps) * extent[0]
    gx, gy = torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None])  # (B, R, n, n)
    coords = torch.stack([gx, gy], dim=-1).reshape(b, r * n, n, 2) * 2 - 1
    out = F.grid_sample(fmap, coords, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(b, dim, r, grid, samples, grid, samples).mean(dim=(4, 6))  # (B, D, R, grid, grid)
    return out.permute(0, 2, 3, 4, 1).reshape(b, r, grid * grid, dim)


def sincos_pos_embed_2d(gh: int, gw: int, dim: int, *, device: torch.device | None = None) -> Tensor:
    """Fixed 2D sin-cos position embedding (MAE) for a ``gh x gw`` token grid: (gh * gw, dim)."""
    if dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                            torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def _transformer(dim: int, heads: int, depth: int, mlp_ratio: float, dropout: float) -> nn.Module:
    """``depth`` pre-norm transformer encoder layers (identity for depth 0)."""
    if depth == 0:
        return nn.Identity()
    return nn.Sequential(*(
        nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
                                   activation="gelu", batch_first=True, norm_first=True)
        for _ in range(depth)
    ))


# --------------------------------------------------------------------------------------------------
# FRL-DGT
# --------------------------------------------------------------------------------------------------


class FRLDGT(nn.Module):
    """FRL-DGT: displacement generation + local/global/full-face transformer fusion.

    See the module docstring for the data flow and for what each option stands for.

    Attributes:
        AUX_LOSSES: Every self-supervised term the network can return in ``outputs["aux_losses"]``
            (unweighted; each is the name of its ``LossWeights`` field).
        active_aux_losses: The terms it computes; all of :attr:`AUX_LOSSES` by default. The
            LightningModule sets it to those with a non-zero loss weight, so a term switched off
            (``model.loss_weights.dgm_flow=0``) is never computed.

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs (used only with ``au_head``).
        in_channels: Channels of ``x2d``: 6 (onset, apex) or 9 (onset, apex, flow u, v, strain).
        au_head: Add an AU detection head (``au_2d``), for comparisons with multi-task FAMNet.
        dgm_width: DGM U-Net width at full resolution.
        dgm_levels: DGM U-Net stride-2 levels.
        dgm_corr_radius: DGM cost-volume radius per level (0 = plain U-Net).
        dgm_mode: ``"joint"`` (trained with the classifier and its aux losses) or ``"frozen"``.
        dgm_weights: Optional local path of a :class:`DisplacementGenerator` state_dict.
        dgm_edge_alpha: Edge-awareness of the smoothness loss (0 = uniform).
        flow_scale: Flow guidance (9-channel input only): None = scale-free correlation; else pixels
            per flow unit. (The weights of the three DGM terms are loss weights,
            ``model.loss_weights.dgm_photo`` / ``dgm_smooth`` / ``dgm_flow``, not options here.)
        token_inputs: Maps stacked for the patch tokens, from ``displacement``, ``difference``
            (apex - onset), ``apex``, ``flow`` (9-channel input only).
        stem_width: Channels of the full-resolution conv before patchifying.
        patch_size: Patch side in pixels.
        embed_dim: Token size (multiple of 4 and of ``heads``).
        heads: Attention heads in every stage.
        mlp_ratio: Transformer MLP hidden size / ``embed_dim``.
        local_depth: Layers of each local (per region group) encoder.
        global_depth: Layers of the encoder across region tokens.
        face_depth: Layers of the full-face encoder.
        region_grid: Tokens per region side (``region_grid**2`` per region).
        share_local: One local encoder for all regions instead of one per group.
        dropout: Dropout in the transformer layers and before the heads.

    Raises:
        ValueError: On an invalid option combination.
        FileNotFoundError: If ``dgm_weights`` does not exist.
    """

    AUX_LOSSES: tuple[str, ...] = DISPLACEMENT_LOSSES

    #: The batch views it reads (the DataModule builds no others): the onset/apex (+ flow) image.
    inputs = ("x2d",)

    def __init__(
        self,
        *,
        num_classes: int,
        num_aus: int = 0,
        in_channels: int = 6,
        au_head: bool = False,
        # displacement generation
        dgm_width: int = 8,
        dgm_levels: int = 3,
        dgm_corr_radius: int = 2,
        dgm_mode: Literal["joint", "frozen"] = "joint",
        dgm_weights: str | None = None,
        dgm_edge_alpha: float = 1.0,
        flow_scale: float | None = None,
        # transformer fusion
        token_inputs: Sequence[str] = ("displacement", "difference"),
        stem_width: int = 16,
        patch_size: int = 4,
        embed_dim: int = 64,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        local_depth: int = 1,
        global_depth: int = 1,
        face_depth: int = 1,
        region_grid: int = 3,
        share_local: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        token_inputs = tuple(token_inputs)  # lists from YAML
        if in_channels not in (6, 9):
            raise ValueError("FRLDGT needs onset and apex frames (6 or 9 channels), "
                             f"got in_channels={in_channels}")
        if dgm_mode not in ("joint", "frozen"):
            raise ValueError(f"dgm_mode must be 'joint' or 'frozen', got {dgm_mode!r}")
        unknown = [t for t in token_inputs if t not in TOKEN_INPUTS]
        if unknown or not token_inputs or len(set(token_inputs)) != len(token_inputs):
            raise ValueError(f"token_inputs must be distinct names from {list(TOKEN_INPUTS)}, "
                             f"got {token_inputs}")
        if "flow" in token_inputs and in_channels != 9:
            raise ValueError("token_inputs 'flow' needs the 9-channel view (onset, apex, flow)")
        if embed_dim % 4 or embed_dim % heads:
            raise ValueError(f"embed_dim must be a multiple of 4 and of heads, "
                             f"got {embed_dim}, heads={heads}")
        if patch_size < 1 or region_grid < 1 or min(local_depth, global_depth, face_depth) < 0:
            raise ValueError("need patch_size, region_grid >= 1 and depths >= 0")
        if au_head and num_aus < 1:
            raise ValueError(f"au_head=True needs num_aus >= 1, got {num_aus}")
        self.in_channels = in_channels
        self.dgm_mode = dgm_mode
        self.token_inputs = token_inputs
        self.patch_size = patch_size
        self.region_grid = region_grid
        self.au_head = au_head
        # How the DGM terms are computed (their weights live in the loss); pre-training reads the same.
        self.loss_options = {"edge_alpha": dgm_edge_alpha, "flow_scale": flow_scale}
        self.active_aux_losses: tuple[str, ...] = self.AUX_LOSSES

        self.dgm = DisplacementGenerator(in_channels=3, width=dgm_width, levels=dgm_levels,
                                         corr_radius=dgm_corr_radius)
        if dgm_weights is not None:
            load_displacement_weights(self.dgm, dgm_weights)
        elif dgm_mode == "frozen":
            warnings.warn("dgm_mode='frozen' without dgm_weights: the displacement generator keeps its "
                          "initialisation (near-zero displacement)", stacklevel=2)
        if dgm_mode == "frozen":
            self.dgm.requires_grad_(False)

        stem_in = sum(TOKEN_INPUTS[t] for t in token_inputs)
        self.stem = nn.Sequential(
            nn.Conv2d(stem_in, stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.GELU(),
            nn.Conv2d(stem_width, embed_dim, patch_size, stride=patch_size),
        )
        groups = (tuple(range(len(REGION_NAMES))),) if share_local else REGION_GROUPS
        self.region_groups = groups
        self.local = nn.ModuleList(_transformer(embed_dim, heads, local_depth, mlp_ratio, dropout)
                                   for _ in groups)
        self.region_pos = nn.Parameter(torch.zeros(1, region_grid**2, embed_dim))
        self.region_type = nn.Parameter(torch.zeros(1, len(REGION_NAMES), embed_dim))
        self.global_fusion = _transformer(embed_dim, heads, global_depth, mlp_ratio, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.face_fusion = _transformer(embed_dim, heads, face_depth, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = MultiTaskHead(embed_dim, num_classes, num_aus if au_head else 0, dropout)
        for p in (self.region_pos, self.region_type, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.register_buffer("template", torch.tensor(TEMPLATE_LANDMARKS), persistent=False)

    def region_boxes(self, landmarks: Tensor | None, batch: int) -> Tensor:
        """(B, 6, 4) normalised region boxes from ``landmarks`` (B, 5, 2), or from the template (for
        every sample when None, and for samples whose landmarks are NaN: no face was found)."""
        template = self.template.expand(batch, -1, -1)
        if landmarks is None:
            landmarks = template
        elif landmarks.shape[0] != batch:
            raise ValueError(f"landmarks batch {landmarks.shape[0]} != x2d batch {batch}")
        elif landmarks.shape == template.shape:  # (other shapes: region_boxes says what it needs)
            unknown = torch.isnan(landmarks).flatten(1).any(1)[:, None, None]
            landmarks = torch.where(unknown, template.to(landmarks.dtype), landmarks)
        return region_boxes(landmarks.to(self.template.dtype))

    def _displacement(self, onset: Tensor, apex: Tensor) -> Tensor:
        if self.dgm_mode == "frozen":
            with torch.no_grad():
                return self.dgm(onset, apex)
        return self.dgm(onset, apex)

    def forward(self, x2d: Tensor | None = None, x3d: Tensor | None = None,
                landmarks: Tensor | None = None) -> dict[str, Tensor | dict[str, Tensor]]:
        """Classify onset/apex pairs.

        Args:
            x2d: (B, 6 or 9, H, W): onset RGB, apex RGB[, flow u, v, strain].
            x3d: Ignored (keyword kept so the LightningModule calls every model alike).
            landmarks: Optional (B, 5, 2) landmarks (normalised xy, MTCNN order); None = template.

        Returns:
            ``emotion`` and ``emotion_2d`` (the same (B, num_classes) logits), ``au_2d``
            (B, num_aus) with ``au_head``, ``displacement`` (B, 2, H, W) and ``aux_losses``
            (name -> *unweighted* scalar, for the terms in :attr:`active_aux_losses`: ``dgm_photo``,
            ``dgm_smooth``[, ``dgm_flow`` with the flow channels]; detached when the DGM is frozen).

        Raises:
            ValueError: If ``x2d`` is missing or not (B, in_channels, H, W).
        """
        if x2d is None or x2d.ndim != 4 or x2d.shape[1] != self.in_channels:
            got = None if x2d is None else tuple(x2d.shape)
            raise ValueError(f"FRLDGT expects x2d of shape (B, C={self.in_channels}, H, W) "
                             f"(onset, apex{', flow' if self.in_channels == 9 else ''}), got {got}")
        b, _, h, w = x2d.shape
        onset, apex = x2d[:, _ONSET], x2d[:, _APEX]
        flow = x2d[:, _FLOW] if self.in_channels == 9 else None

        displacement = self._displacement(onset, apex)
        aux = displacement_losses(onset, apex, displacement, flow=None if flow is None else flow[:, :2],
                                  terms=self.active_aux_losses, **self.loss_options)
        if self.dgm_mode == "frozen":
            aux = {k: v.detach() for k, v in aux.items()}

        maps = {"displacement": displacement, "difference": apex - onset, "apex": apex, "flow": flow}
        x = torch.cat([maps[name] for name in self.token_inputs], dim=1)
        p = self.patch_size
        pad = (0, (-w) % p, 0, (-h) % p)
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        fmap = self.stem(x)  # (B, D, Gh, Gw)
        gh, gw = fmap.shape[-2:]
        pos = sincos_pos_embed_2d(gh, gw, fmap.shape[1], device=fmap.device).to(fmap.dtype)
        fmap = fmap + pos.t().reshape(1, -1, gh, gw)
        patches = fmap.flatten(2).transpose(1, 2)  # (B, Gh * Gw, D)

        # (a) local fusion inside each AU region
        boxes = self.region_boxes(landmarks, b)
        regions = roi_tokens(fmap, boxes, self.region_grid, extent=(h / (gh * p), w / (gw * p)))
        regions = regions + self.region_pos  # (B, R, r*r, D)
        pooled = []
        for encoder, idx in zip(self.local, self.region_groups):
            tokens = regions[:, list(idx)].flatten(0, 1)  # (B * n, r*r, D)
            pooled.append(encoder(tokens).mean(dim=1).view(b, len(idx), -1))
        region_tok = torch.cat(pooled, dim=1) + self.region_type  # groups are contiguous, in order
        # (b) global fusion across regions
        region_tok = self.global_fusion(region_tok)
        # (c) full-face fusion: CLS + regions + all patches
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), region_tok, patches], dim=1)
        embedding = self.norm(self.face_fusion(tokens)[:, 0])

        emotion, au = self.head(embedding)
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "emotion": emotion, "emotion_2d": emotion, "displacement": displacement, "aux_losses": aux,
        }
        if self.au_head:
            out["au_2d"] = au
        return out

