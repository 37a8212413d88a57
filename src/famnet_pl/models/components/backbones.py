"""Backbones by name: timm 2D networks and torchvision video ResNets, with attention after their stages.

Implements:
    * :class:`TimmBackbone2D`: any timm CNN with ``features_only`` (``efficientnet_b0``,
      ``convnext_nano``, ...) with an attention module after each of its last four feature stages.
    * :func:`build_backbone_2d` / :func:`build_backbone_3d`: the factories FAMNet's branches use.
      They resolve the ``pretrained`` option (None / the library's weights / a local file) and
      pick the class: ``resnet18``/``resnet34`` -> :class:`~.resnet.ResNet2D` (stage-wise
      attention, today's parameter names), other timm names -> :class:`TimmBackbone2D`,
      ``r3d_18``/``mc3_18``/``r2plus1d_18`` -> :class:`~.resnet.ResNet3D`.

Data flow (TimmBackbone2D)::

    x -> timm stem -> ... -> stage_{n-3} -> attn_1 -> ... -> stage_n -> attn_4 -> avgpool (pool_grid)
      -> flatten -> (B, C_n * pool_grid**2)

The attention after the first three of those stages is a forward hook on the stage module that
returns ``attention(output)``, so the gated map is what the next stage reads, whatever feature
wrapper timm chose for the model; the last attention is applied to the returned final map.

What the paper fixes and what we chose: FAMNet (arXiv 2508.13483) uses ResNet18 in both
branches, which stays the default (``backbone_2d: resnet18``, ``backbone_3d: r3d_18``); the
other backbones are ours, for ablations. ``width`` shrinks only the ResNets (CPU demos, CI):
other timm models have their own fixed widths, so ``width != 64`` with them is an error rather
than silently ignored, as is ``small_input`` (their stems differ).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.models import split_model_name_tag
from torch import Tensor, nn

from famnet_pl.models.components.resnet import (
    LIBRARY_WIDTH,
    RESNET_LAYERS_2D,
    ResNet2D,
    ResNet3D,
    VideoArch,
    _check_grid,
    _check_input,
    _check_stages,
    _stage_attention,
    create_timm_model,
    load_pretrained,
)

log = logging.getLogger(__name__)

# Names of the library weights accepted by pretrained_2d / pretrained_3d (besides a file path).
IMAGENET = "imagenet"
KINETICS400 = "kinetics400"
# Backbones tested here; any other timm model with features_only also works (timm.list_models()).
BACKBONES_2D: dict[str, str] = {
    "resnet18": "ResNet2D: timm ResNet18, attention after each stage (the paper's; default)",
    "resnet34": "ResNet2D: timm ResNet34, attention after each stage",
    "efficientnet_b0": "TimmBackbone2D: EfficientNet-B0, attention after its last 4 feature stages",
    "convnext_nano": "TimmBackbone2D: ConvNeXt-nano, attention after its 4 stages",
}
BACKBONES_3D: tuple[str, ...] = ("r3d_18", "mc3_18", "r2plus1d_18")
_NUM_ATTENDED = 4


def _gate(attention: nn.Module, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook: replace a stage's output by its gated version (``functools.partial`` over the
    attention, not a lambda, so ``copy.deepcopy`` and pickling carry the hook along)."""
    return attention(output)


def _stage_module(features: nn.Module, name: str) -> nn.Module:
    """A stage module of a timm feature model, by its ``feature_info`` name.

    ``FeatureListNet`` flattens ``stages.0`` into a child called ``stages_0``; other feature
    classes keep the original names.
    """
    for candidate in (name, name.replace(".", "_")):
        try:
            return features.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"cannot find feature stage {name!r} in {type(features).__name__}")


class TimmBackbone2D(nn.Module):
    """A timm CNN (``features_only``) with attention after each of its last four feature stages.

    Args:
        name: timm model name, optionally with a pretrained tag (``convnext_nano.in12k_ft_in1k``).
        in_channels: Input image channels (timm adapts pretrained first convs).
        attention: ``"cbam"``, ``"se"`` or ``"none"``.
        attention_stages: 1-based, among the last four feature stages (strides 4-32 for the usual
            CNNs), followed by attention.
        pool_grid: Final pooling grid of the last stage (1 = global average; see ResNet2D).
        pretrained: timm's ImageNet weights for ``name`` (cache first, see ``create_timm_model``).
        file: A local weight file of ``name`` (timm's full-model state_dict), loaded by timm.

    Attributes:
        out_features: ``channels of the last stage * pool_grid**2``.
        features: The timm feature model (parameter names are timm's, under ``features.``).
    """

    def __init__(
        self,
        *,
        name: str,
        in_channels: int = 3,
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        pool_grid: int = 1,
        pretrained: bool = False,
        file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        _check_stages((1,) * _NUM_ATTENDED, attention_stages)  # block counts are timm's; checks the stages
        self.name = name
        self.in_channels = in_channels
        self.features = create_timm_model(name, pretrained=pretrained, file=file, in_chans=in_channels,
                                          features_only=True)
        if str(getattr(self.features, "output_fmt", "NCHW")).split(".")[-1] != "NCHW":
            raise ValueError(f"{name}: TimmBackbone2D needs (B, C, H, W) stage outputs (a CNN)")
        info = self.features.feature_info
        if len(info) < _NUM_ATTENDED:
            raise ValueError(f"{name} has {len(info)} feature stages; TimmBackbone2D needs {_NUM_ATTENDED}")
        channels = info.channels()[-_NUM_ATTENDED:]
        modules = info.module_name()[-_NUM_ATTENDED:]
        self.attention = _stage_attention(attention, attention_stages, channels, dims=2)
        # Attentions 1-3 gate what the next stage reads; the 4th is applied to the output in forward.
        for attn, module_name in zip(self.attention[:-1], modules[:-1]):
            _stage_module(self.features, module_name).register_forward_hook(functools.partial(_gate, attn))
        self.avgpool = nn.AdaptiveAvgPool2d(_check_grid(pool_grid))
        self.out_features = channels[-1] * pool_grid**2

    def forward(self, x: Tensor) -> Tensor:
        """Map images (B, C, H, W) to pooled features (B, out_features)."""
        _check_input(x, ndim=4, in_channels=self.in_channels, name=f"TimmBackbone2D({self.name})",
                     layout="(B, C, H, W)")
        last = self.features(x)[-1]
        return torch.flatten(self.avgpool(self.attention[-1](last)), 1)


def _weight_source(pretrained: str | None, *, library: str, option: str) -> Literal["library"] | Path | None:
    """None (random init), ``"library"`` (the library's own weights) or an existing local file."""
    if pretrained is None:
        return None
    if pretrained == library:
        return "library"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{option}={pretrained}: no such file. Pass {library} (the library's weights, from its cache or "
            f"downloaded), the path of a local state_dict file, or null to train from scratch."
        )
    return path


def _check_pretrained_width(width: int, pretrained: str | None, option: str) -> None:
    if pretrained is not None and width != LIBRARY_WIDTH:
        raise ValueError(
            f"{option}={pretrained} needs width {LIBRARY_WIDTH} (pretrained weights have the library's "
            f"widths), got width {width}; set the width to {LIBRARY_WIDTH} or {option} to null"
        )


def build_backbone_2d(
    name: str = "resnet18",
    *,
    # input
    in_channels: int = 3,
    small_input: bool = False,
    # capacity and attention
    width: int = 64,
    attention: str = "cbam",
    attention_stages: Sequence[int] = (1, 2, 3, 4),
    pool_grid: int = 1,
    # weights
    pretrained: str | None = None,
) -> ResNet2D | TimmBackbone2D:
    """Build a 2D backbone by timm name.

    Args:
        name: ``"resnet18"`` / ``"resnet34"`` (-> :class:`ResNet2D`) or any timm model supporting
            ``features_only`` (-> :class:`TimmBackbone2D`), optionally with a pretrained tag.
        in_channels: Image channels.
        small_input: 3x3 stride-1 stem without maxpool (ResNets only).
        width: First-stage channels (ResNets only; other models need 64, their own widths).
        attention: ``"cbam"``, ``"se"`` or ``"none"``.
        attention_stages: 1-based stages followed by attention.
        pool_grid: Final spatial pooling grid.
        pretrained: None (random init), ``"imagenet"`` (timm's weights for ``name``: Hugging Face
            cache, else download) or a local weight file (ResNets: torchvision or timm resnet
            state_dict via :func:`load_pretrained`; others: timm's state_dict of ``name``).

    Raises:
        ValueError: Unknown name, ``width``/``small_input`` where they do not apply, or
            pretrained weights with ``width != 64``.
        FileNotFoundError: ``pretrained`` is neither ``"imagenet"`` nor an existing file.
        PretrainedWeightsError: ``"imagenet"`` offline with nothing cached (one-line fix).
    """
    attention_stages = tuple(attention_stages)
    source = _weight_source(pretrained, library=IMAGENET, option="pretrained_2d")
    _check_pretrained_width(width, pretrained, "pretrained_2d")
    arch = split_model_name_tag(name)[0]
    if arch in RESNET_LAYERS_2D:
        net = ResNet2D(arch=name, in_channels=in_channels, width=width, attention=attention,
                       attention_stages=attention_stages, small_input=small_input, pool_grid=pool_grid,
                       pretrained=source == "library")
        if isinstance(source, Path):
            loaded, skipped = load_pretrained(net, source, kind=arch)  # type: ignore[arg-type]
            log.info("2D backbone %s: loaded %d tensors from %s, skipped %s",
                     name, len(loaded), source, skipped)
        return net
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown 2D backbone {name!r}: use one of {list(BACKBONES_2D)} or another timm model name "
            "with features_only support (timm.list_models() lists them)"
        )
    if width != LIBRARY_WIDTH:
        raise ValueError(
            f"width={width} applies only to {list(RESNET_LAYERS_2D)}; {name} has its own widths, "
            f"set the width to {LIBRARY_WIDTH}"
        )
    if small_input:
        raise ValueError(f"small_input applies only to {list(RESNET_LAYERS_2D)}, not {name}")
    return TimmBackbone2D(name=name, in_channels=in_channels, attention=attention,
                          attention_stages=attention_stages, pool_grid=pool_grid,
                          pretrained=source == "library", file=source if isinstance(source, Path) else None)


def build_backbone_3d(
    arch: VideoArch = "r3d_18",
    *,
    # input
    in_channels: int = 3,
    temporal_stride_stem: int = 1,
    # capacity and attention
    width: int = 64,
    attention: str = "cbam",
    attention_stages: Sequence[int] = (1, 2, 3, 4),
    pool_grid: int = 1,
    # weights
    pretrained: str | None = None,
) -> ResNet3D:
    """Build a torchvision video ResNet backbone (:class:`ResNet3D`).

    Args:
        arch: ``"r3d_18"``, ``"mc3_18"`` or ``"r2plus1d_18"``.
        in_channels: Channels per frame.
        temporal_stride_stem: Temporal stride of the stem.
        width: First-stage channels (64 = torchvision's).
        attention: ``"cbam"``, ``"se"`` or ``"none"``.
        attention_stages: 1-based stages followed by attention.
        pool_grid: Final spatial pooling grid.
        pretrained: None (random init), ``"kinetics400"`` (torchvision's weights: torch hub cache,
            else download) or a local torchvision state_dict of ``arch`` (:func:`load_pretrained`).

    Raises:
        ValueError: Unknown arch, or pretrained weights with ``width != 64``.
        FileNotFoundError: ``pretrained`` is neither ``"kinetics400"`` nor an existing file.
        PretrainedWeightsError: ``"kinetics400"`` offline with nothing cached (one-line fix).
    """
    if arch not in BACKBONES_3D:
        raise ValueError(f"3D backbone must be one of {list(BACKBONES_3D)}, got {arch!r}")
    source = _weight_source(pretrained, library=KINETICS400, option="pretrained_3d")
    _check_pretrained_width(width, pretrained, "pretrained_3d")
    net = ResNet3D(arch=arch, in_channels=in_channels, width=width, attention=attention,
                   attention_stages=tuple(attention_stages), temporal_stride_stem=temporal_stride_stem,
                   pool_grid=pool_grid, pretrained=source == "library")
    if isinstance(source, Path):
        loaded, skipped = load_pretrained(net, source, kind=arch)
        log.info("3D backbone %s: loaded %d tensors from %s, skipped %s", arch, len(loaded), source, skipped)
    return net
