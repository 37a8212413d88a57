"""FAMNet: fused 2D + 3D multi-task networks for micro-expression recognition.

Implements the networks of FAMNet (Fu et al., IJCNN 2025, arXiv 2508.13483):

* :class:`AMNet2D`: ResNet18 + attention on a static image view (the apex frame).
* :class:`AMNet3D`: R3D-18 + attention on a frame clip.
* :class:`FAMNet`: one or both branches, with their predictions fused.

Data flow::

    x2d (B, C, H, W)    -> ResNet2D [stage_i -> attn_i] x4 -> pool -> MultiTaskHead -> emotion_2d, au_2d
    x3d (B, C, T, H, W) -> ResNet3D [stage_i -> attn_i] x4 -> pool -> MultiTaskHead -> emotion_3d, au_3d
    fusion (components/fusion.py: late | learned | gated | feature)             -> emotion_fused
    late:           log(w * softmax(emotion_2d) + (1 - w) * softmax(emotion_3d))

Each branch learns emotion classification and multi-label action unit (AU)
detection jointly with a hard-shared backbone (only the last linear layers are
task-specific). Models are registered by name (``famnet_r18``, ``amnet2d_r18``,
``amnet3d_r18``) in :mod:`famnet_pl.models.registry`.

These are pure ``nn.Module`` s; losses and training live in the LightningModule.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

from torch import Tensor, nn

from famnet_pl.models.components.backbones import build_backbone_2d, build_backbone_3d
from famnet_pl.models.components.fusion import FUSIONS, BranchFusion, FusionMode
from famnet_pl.models.components.heads import MultiTaskHead
from famnet_pl.models.components.resnet import VideoArch
from famnet_pl.models.registry import register_model

log = logging.getLogger(__name__)

_BRANCHES: dict[str, tuple[bool, bool]] = {"2d3d": (True, True), "2d": (True, False), "3d": (False, True)}
# Hidden size of the FeatureFusion MLP; small because training sets are ~100s of clips.
_FUSION_HIDDEN = 128


class _AttentionMultiTaskNet(nn.Module):
    """Shared part of AMNet2D/AMNet3D: backbone -> pooled features -> emotion and AU heads."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_aus: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = MultiTaskHead(backbone.out_features, num_classes, num_aus, dropout)
        self.out_features = backbone.out_features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``emotion`` (B, C) logits, ``au`` (B, A) logits, ``features`` (B, F)."""
        features = self.backbone(x)
        emotion, au = self.head(features)
        return {"emotion": emotion, "au": au, "features": features}


class AMNet2D(_AttentionMultiTaskNet):
    """2D attention multi-task network: 2D backbone (ResNet18 by default) + emotion/AU heads.

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs (0 disables the AU head).
        in_channels: Image channels.
        backbone: timm name: ``"resnet18"`` (the paper's), ``"resnet34"`` or another timm CNN
            (``"efficientnet_b0"``, ``"convnext_nano"``...; see ``components/backbones.py``).
        width: Backbone base width (64 = ResNet18; other widths only for the ResNets).
        attention: ``"cbam"``, ``"se"`` or ``"none"``.
        attention_stages: 1-based stages followed by attention.
        small_input: 3x3 stride-1 stem without maxpool, for 32-64 px inputs.
        pool_grid: Final spatial pooling grid (1 = global average; see ResNet2D).
        dropout: Dropout before the heads.
        pretrained: None, ``"imagenet"`` (timm's weights) or a local weight file
            (see :func:`~famnet_pl.models.components.backbones.build_backbone_2d`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_aus: int,
        in_channels: int = 3,
        backbone: str = "resnet18",
        width: int = 64,
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        small_input: bool = False,
        pool_grid: int = 1,
        dropout: float = 0.0,
        pretrained: str | None = None,
    ) -> None:
        net = build_backbone_2d(backbone, in_channels=in_channels, width=width, attention=attention,
                                attention_stages=attention_stages, small_input=small_input,
                                pool_grid=pool_grid, pretrained=pretrained)
        super().__init__(net, num_classes, num_aus, dropout)


class AMNet3D(_AttentionMultiTaskNet):
    """3D attention multi-task network: torchvision video ResNet backbone (R3D-18) + emotion/AU heads.

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs (0 disables the AU head).
        in_channels: Channels per frame.
        backbone: ``"r3d_18"`` (the paper's ResNet18 in 3D), ``"mc3_18"`` or ``"r2plus1d_18"``.
        width: Backbone base width (64 = R3D-18).
        attention: ``"cbam"``, ``"se"`` or ``"none"``.
        attention_stages: 1-based stages followed by attention.
        temporal_stride_stem: Temporal stride of the stem conv.
        pool_grid: Final spatial pooling grid (1 = global average; see ResNet3D).
        dropout: Dropout before the heads.
        pretrained: None, ``"kinetics400"`` (torchvision's weights) or a local state_dict file
            (see :func:`~famnet_pl.models.components.backbones.build_backbone_3d`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_aus: int,
        in_channels: int = 3,
        backbone: VideoArch = "r3d_18",
        width: int = 64,
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        temporal_stride_stem: int = 1,
        pool_grid: int = 1,
        dropout: float = 0.0,
        pretrained: str | None = None,
    ) -> None:
        net = build_backbone_3d(backbone, in_channels=in_channels, width=width, attention=attention,
                                attention_stages=attention_stages, temporal_stride_stem=temporal_stride_stem,
                                pool_grid=pool_grid, pretrained=pretrained)
        super().__init__(net, num_classes, num_aus, dropout)


class FAMNet(nn.Module):
    """FAMNet: AMNet2D and/or AMNet3D with fused emotion predictions.

    Options (what the paper fixes, what it leaves open, and our defaults):

    * ``branches`` -- the paper's model is both branches (``"2d3d"``); ``"2d"``
      (AMNet2D alone) and ``"3d"`` (AMNet3D alone) are its single-branch ablations.
    * ``num_aus`` -- the paper trains AU detection jointly with emotion
      recognition (multi-task, hard parameter sharing). ``0`` disables the AU
      heads (``au_*`` outputs are then (B, 0)) for datasets without AU labels.
    * ``in_channels_2d`` / ``in_channels_3d`` -- the paper feeds the apex frame
      (RGB) to AMNet2D and the video clip to AMNet3D. Other views (e.g. onset and
      apex stacked = 6 channels, or optical flow) only change these counts.
    * ``backbone_2d`` / ``backbone_3d`` -- the paper uses ResNet18 in both branches:
      defaults ``"resnet18"`` (timm) and ``"r3d_18"`` (torchvision). Ablations: ``"resnet34"``
      or any timm CNN by name (``"efficientnet_b0"``, ``"convnext_nano"``) for 2D;
      ``"mc3_18"`` / ``"r2plus1d_18"`` for 3D (see ``components/backbones.py``).
    * ``width_2d`` / ``width_3d`` -- the paper uses ResNet18 (width 64). Smaller
      widths (8-16) are for CPU demos and CI (ResNets only); they cannot use pretrained weights.
    * ``attention`` -- the paper uses "hierarchical attention" without fixing the
      module; default ``"cbam"`` (channel + spatial gating suits small, localised
      facial motions); ``"se"`` (channel only) and ``"none"`` are ablations.
    * ``attention_stages`` -- placement is left open; default after all four
      stages (1, 2, 3, 4), i.e. attention at every level of the hierarchy.
    * ``fusion`` -- the paper fuses the two branches' score vectors in a "late
      fusion module" followed by softmax; default ``"late"`` (log of the weighted
      mean of the branch softmaxes, usable as logits). ``"learned"`` trains that
      weight, ``"gated"`` predicts it per sample from both branches' features,
      ``"feature"`` concatenates the pooled features and classifies them with an
      MLP (alternatives the paper does not use); see ``components/fusion.py``.
    * ``late_weight`` -- weight of the 2D branch in late fusion (3D gets
      ``1 - late_weight``); the weighting is not specified, default 0.5 (equal).
      The LitModule can choose it on inner validation (``late_weight_from: val``).
    * ``small_input_2d`` -- not in the paper: a 3x3 stride-1 stem without maxpool
      for 32-64 px faces, which the ImageNet stem would shrink 4x at once.
    * ``temporal_stride_stem`` -- not in the paper; default 1 as in torchvision's
      r3d_18, keeping every frame of short micro-expression clips.
    * ``pool_grid`` -- not in the paper: ResNet18 ends in global average pooling
      (default 1). With aligned faces the location of a motion identifies the AU, and
      a coarse grid (2-3) keeps it; the CPU demo uses 3 (it lifts synthetic-set
      UAR a lot: global pooling sees *that* something moved, not *where*).
    * ``dropout`` -- before the task heads (and inside the feature-fusion MLP);
      unspecified, default 0.0.
    * ``pretrained_2d`` / ``pretrained_3d`` -- not fixed by the paper; default None
      (random init). ``"imagenet"`` / ``"kinetics400"``: the libraries' own weights (timm via the
      Hugging Face hub, torchvision via the torch hub), read from their caches
      (``$HF_HOME/hub``, ``$TORCH_HOME/hub/checkpoints``) and downloaded only when missing and
      allowed (not with ``HF_HUB_OFFLINE=1``); offline with nothing cached,
      :class:`~famnet_pl.models.components.resnet.PretrainedWeightsError` says in one line what
      to download and where. Or a local state_dict file (torchvision/timm ``resnet18`` /
      ``r3d_18`` ...), loaded by :func:`~famnet_pl.models.components.resnet.load_pretrained`.
      Weights need width 64.

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs per branch head (0 = no AU task).
        in_channels_2d: Channels of ``x2d``.
        in_channels_3d: Channels of ``x3d``.
        branches: ``"2d3d"``, ``"2d"`` or ``"3d"``.
        width_2d: Base width of the 2D backbone.
        width_3d: Base width of the 3D backbone.
        backbone_2d: timm name of the 2D backbone (``"resnet18"``, ``"resnet34"``, other timm CNNs).
        backbone_3d: ``"r3d_18"``, ``"mc3_18"`` or ``"r2plus1d_18"``.
        attention: ``"cbam"``, ``"se"`` or ``"none"`` (both branches).
        attention_stages: 1-based stages followed by attention (both branches).
        fusion: ``"late"``, ``"learned"``, ``"gated"`` or ``"feature"`` (used only with both branches).
        late_weight: Weight of the 2D branch in late fusion, in [0, 1].
        small_input_2d: Small-input stem for the 2D backbone.
        temporal_stride_stem: Temporal stride of the 3D stem.
        pool_grid: Final spatial pooling grid of both backbones (1 = global average).
        dropout: Dropout probability before the heads.
        pretrained_2d: None, ``"imagenet"`` (timm's weights) or a local weight file.
        pretrained_3d: None, ``"kinetics400"`` (torchvision's weights) or a local weight file.

    Raises:
        ValueError: On an unknown ``branches`` / ``fusion`` / ``attention`` / backbone value,
            ``late_weight`` outside [0, 1], or pretrained weights with a width other than 64.
        FileNotFoundError: If a pretrained path does not exist.
        PretrainedWeightsError: Library weights offline and not cached (one-line fix).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_aus: int = 0,
        in_channels_2d: int = 3,
        in_channels_3d: int = 3,
        branches: Literal["2d3d", "2d", "3d"] = "2d3d",
        width_2d: int = 64,
        width_3d: int = 64,
        backbone_2d: str = "resnet18",
        backbone_3d: VideoArch = "r3d_18",
        attention: Literal["cbam", "se", "none"] = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        fusion: FusionMode = "late",
        late_weight: float = 0.5,
        small_input_2d: bool = False,
        temporal_stride_stem: int = 1,
        pool_grid: int = 1,
        dropout: float = 0.0,
        pretrained_2d: str | None = None,
        pretrained_3d: str | None = None,
    ) -> None:
        super().__init__()
        if branches not in _BRANCHES:
            raise ValueError(f"branches must be one of {list(_BRANCHES)}, got {branches!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if not 0.0 <= late_weight <= 1.0:
            raise ValueError(f"late_weight must be in [0, 1], got {late_weight}")
        use_2d, use_3d = _BRANCHES[branches]
        self.branches = branches
        #: The batch views the active branches read; the DataModule builds no others.
        self.inputs = tuple(key for key, used in (("x2d", use_2d), ("x3d", use_3d)) if used)
        self.fusion_mode = fusion
        # Tuples survive config round trips as lists; normalise once.
        attention_stages = tuple(attention_stages)

        self.branch_2d: AMNet2D | None = None
        self.branch_3d: AMNet3D | None = None
        if use_2d:
            self.branch_2d = AMNet2D(
                num_classes=num_classes,
                num_aus=num_aus,
                in_channels=in_channels_2d,
                backbone=backbone_2d,
                width=width_2d,
                attention=attention,
                attention_stages=attention_stages,
                small_input=small_input_2d,
                pool_grid=pool_grid,
                dropout=dropout,
                pretrained=pretrained_2d,
            )
        if use_3d:
            self.branch_3d = AMNet3D(
                num_classes=num_classes,
                num_aus=num_aus,
                in_channels=in_channels_3d,
                backbone=backbone_3d,
                width=width_3d,
                attention=attention,
                attention_stages=attention_stages,
                temporal_stride_stem=temporal_stride_stem,
                pool_grid=pool_grid,
                dropout=dropout,
                pretrained=pretrained_3d,
            )

        self.fusion: BranchFusion | None = None
        if self.branch_2d is not None and self.branch_3d is not None:
            self.fusion = BranchFusion(fusion, features_2d=self.branch_2d.out_features,
                                       features_3d=self.branch_3d.out_features, num_classes=num_classes,
                                       late_weight=late_weight, hidden=_FUSION_HIDDEN, dropout=dropout)

        self._load_pretrained(pretrained_2d, pretrained_3d)

    def _load_pretrained(self, pretrained_2d: str | None, pretrained_3d: str | None) -> None:
        """Account for the pretrained options once the branches exist.

        The weights themselves are loaded while each active branch builds its backbone
        (``build_backbone_2d/3d``: timm and torchvision take them at construction); what is
        left is to say so, and to warn when weights were given for an inactive branch.
        """
        for spec, branch, name in (
            (pretrained_2d, self.branch_2d, "2d"),
            (pretrained_3d, self.branch_3d, "3d"),
        ):
            if spec is None:
                continue
            if branch is None:
                warnings.warn(
                    f"pretrained_{name} given but the {name} branch is inactive "
                    f"(branches={self.branches!r}); ignored",
                    stacklevel=3,
                )
                continue
            log.info("FAMNet %s branch: pretrained weights from %s", name, spec)

    def forward(self, x2d: Tensor | None = None, x3d: Tensor | None = None) -> dict[str, Tensor]:
        """Run the active branches and fuse their emotion logits.

        Args:
            x2d: (B, in_channels_2d, H, W) images; required if the 2D branch is active.
            x3d: (B, in_channels_3d, T, H, W) clips; required if the 3D branch is active.
                Inputs for an inactive branch are ignored.

        Returns:
            Dict with ``emotion_2d``/``au_2d`` (2D branch), ``emotion_3d``/``au_3d``
            (3D branch), ``emotion_fused`` (both branches) and ``emotion``: the
            headline logits (the fused ones with both branches, else the single
            branch's). Emotion tensors are (B, num_classes), AU tensors (B, num_aus).

        Raises:
            ValueError: If an active branch's input is missing or has the wrong
                number of dimensions/channels, or batch sizes differ.
        """
        out: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        for name, branch, x, layout in (
            ("2d", self.branch_2d, x2d, "x2d of shape (B, C, H, W)"),
            ("3d", self.branch_3d, x3d, "x3d of shape (B, C, T, H, W)"),
        ):
            if branch is None:
                continue
            if x is None:
                raise ValueError(f"FAMNet branch '{name}' (branches={self.branches!r}) needs {layout}, "
                                 "got None")
            res = branch(x)
            out[f"emotion_{name}"] = res["emotion"]
            out[f"au_{name}"] = res["au"]
            features[name] = res["features"]

        if len(features) == 2:
            if features["2d"].shape[0] != features["3d"].shape[0]:
                raise ValueError(
                    f"x2d and x3d batch sizes differ: {features['2d'].shape[0]} vs {features['3d'].shape[0]}"
                )
            assert self.fusion is not None
            out["emotion_fused"] = self.fusion(out["emotion_2d"], out["emotion_3d"], features["2d"],
                                               features["3d"])
            out["emotion"] = out["emotion_fused"]
        else:
            (name,) = features
            out["emotion"] = out[f"emotion_{name}"]
        return out


def _famnet_with_branches(branches: str, kwargs: dict[str, Any]) -> FAMNet:
    """Build a FAMNet whose ``branches`` is fixed by the registered name."""
    given = kwargs.pop("branches", branches)
    if given != branches:
        raise ValueError(f"this model name fixes branches={branches!r}, got branches={given!r}")
    return FAMNet(branches=branches, **kwargs)  # type: ignore[arg-type]


@register_model("famnet_r18")
def famnet_r18(**kwargs: Any) -> FAMNet:
    """FAMNet with both ResNet18 branches (AMNet2D + AMNet3D) and fusion."""
    return _famnet_with_branches("2d3d", kwargs)


@register_model("amnet2d_r18")
def amnet2d_r18(**kwargs: Any) -> FAMNet:
    """FAMNet with only the 2D branch (AMNet2D, ResNet18 on the static view)."""
    return _famnet_with_branches("2d", kwargs)


@register_model("amnet3d_r18")
def amnet3d_r18(**kwargs: Any) -> FAMNet:
    """FAMNet with only the 3D branch (AMNet3D, R3D-18 on the clip)."""
    return _famnet_with_branches("3d", kwargs)
