"""ResNet18 backbones (2D and 3D) with hierarchical attention, and local weight loading.

Implements:
    * :class:`ResNet2D`: ResNet18 topology for a static image (FAMNet's AMNet2D
      backbone, fed the apex frame or another single-image view).
    * :class:`ResNet3D`: R3D-18 topology for a frame clip (FAMNet's AMNet3D backbone).
    * :func:`load_pretrained`: copy a *local* torchvision ``resnet18`` / ``r3d_18``
      state_dict into either backbone, adapting or skipping mismatched tensors.

Data flow (both backbones)::

    stem -> [stage_i -> attention_i] x 4 -> global avgpool -> flatten -> (B, width * 8)

where ``attention_i`` is a CBAM/SE module for stages listed in ``attention_stages``
and identity otherwise ("hierarchical attention": gating at several depths).

Design source: blocks are torchvision's own (``torchvision.models.resnet.BasicBlock``
and ``torchvision.models.video.resnet.BasicBlock`` + ``Conv3DSimple``) and the
parameter names match torchvision's (``conv1``/``bn1``/``layer1..4`` for 2D,
``stem.0``/``stem.1``/``layer1..4`` for 3D), so ImageNet / Kinetics-400 weights
load by name. FAMNet (arXiv 2508.13483) specifies ResNet18 in both branches plus
attention modules; where the attention goes is not specified, see ``attention.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock as BasicBlock2D
from torchvision.models.video.resnet import BasicBlock as BasicBlock3D
from torchvision.models.video.resnet import Conv3DSimple

from famnet_pl.models.components.attention import make_attention

log = logging.getLogger(__name__)

_NUM_STAGES = 4


def _check_stages(layers: Sequence[int], attention_stages: Sequence[int]) -> None:
    """Validate the per-stage block counts and the attention placement."""
    if len(layers) != _NUM_STAGES or any(n < 1 for n in layers):
        raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
    bad = [s for s in attention_stages if s not in range(1, _NUM_STAGES + 1)]
    if bad:
        raise ValueError(f"attention_stages must be drawn from (1, 2, 3, 4), got {tuple(attention_stages)}")


def _init_weights(modules: Sequence[nn.Module]) -> None:
    """torchvision's ResNet init: Kaiming (fan_out) convs, BN gamma=1 / beta=0."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _check_grid(pool_grid: int) -> int:
    if pool_grid < 1:
        raise ValueError(f"pool_grid must be >= 1, got {pool_grid}")
    return pool_grid


def _check_input(x: Tensor, *, ndim: int, in_channels: int, name: str, layout: str) -> None:
    """Raise a readable ValueError instead of a conv shape error."""
    if x.ndim != ndim or x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expects input of shape {layout} with C={in_channels}, got shape {tuple(x.shape)}"
        )


class ResNet2D(nn.Module):
    """ResNet18-style 2D backbone with attention after selected stages.

    Args:
        in_channels: Input image channels (3 for RGB; e.g. 6 for two stacked frames).
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
            64 is the torchvision ResNet18.
        layers: BasicBlocks per stage; ``(2, 2, 2, 2)`` is ResNet18.
        attention: ``"cbam"``, ``"se"`` or ``"none"`` (see ``attention.py``).
        attention_stages: 1-based stages followed by an attention module.
        small_input: Use a 3x3 stride-1 stem without maxpool (CIFAR-style) so
            32-64 px faces are not downsampled 4x before the first stage. The stem
            then no longer matches ImageNet weights (``conv1`` is skipped on load).
        pool_grid: Final pooling to a ``pool_grid x pool_grid`` grid instead of one global
            average (1, as in ResNet18). On aligned faces *where* the motion is tells the AU;
            global pooling throws that away, a coarse grid keeps it.

    Attributes:
        out_features: Size of the pooled feature vector (``width * 8 * pool_grid**2``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        width: int = 64,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        small_input: bool = False,
        pool_grid: int = 1,
    ) -> None:
        super().__init__()
        _check_stages(layers, attention_stages)
        self.in_channels = in_channels
        self.small_input = small_input
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        self._inplanes = width
        channels = [width * m for m in (1, 2, 4, 8)]
        self.layer1 = self._make_layer(channels[0], layers[0], stride=1)
        self.layer2 = self._make_layer(channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(channels[3], layers[3], stride=2)
        # Only the backbone gets the ResNet init; attention keeps PyTorch defaults
        # (Kaiming fan_out on the tiny CBAM spatial conv would saturate its sigmoid).
        _init_weights([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

        self.attention = nn.ModuleList(
            make_attention(attention if i + 1 in attention_stages else "none", c, dims=2)  # type: ignore[arg-type]
            for i, c in enumerate(channels)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(_check_grid(pool_grid))
        self.out_features = channels[-1] * pool_grid**2

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One ResNet stage, as in ``torchvision.models.ResNet._make_layer``."""
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        modules = [BasicBlock2D(self._inplanes, planes, stride=stride, downsample=downsample)]
        self._inplanes = planes
        modules += [BasicBlock2D(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (B, C, H, W) to pooled features (B, out_features)."""
        _check_input(x, ndim=4, in_channels=self.in_channels, name="ResNet2D", layout="(B, C, H, W)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer, attn in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.attention):
            x = attn(layer(x))
        return torch.flatten(self.avgpool(x), 1)


class ResNet3D(nn.Module):
    """R3D-18-style 3D backbone with attention after selected stages.

    Args:
        in_channels: Input channels per frame (3 for RGB).
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
            64 is torchvision's ``r3d_18``.
        layers: 3D BasicBlocks per stage; ``(2, 2, 2, 2)`` is R3D-18.
        attention: ``"cbam"``, ``"se"`` or ``"none"`` (3D variants, over T, H, W).
        attention_stages: 1-based stages followed by an attention module.
        temporal_stride_stem: Temporal stride of the (3, 7, 7) stem conv. 1 (as in
            r3d_18) keeps every frame, which matters for short, subtle clips;
            2 halves compute for long clips.
        pool_grid: Final pooling: global over time, ``pool_grid x pool_grid`` over space
            (1 = global average, as in r3d_18); see ResNet2D.

    Attributes:
        out_features: Size of the pooled feature vector (``width * 8 * pool_grid**2``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        width: int = 64,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        temporal_stride_stem: int = 1,
        pool_grid: int = 1,
    ) -> None:
        super().__init__()
        _check_stages(layers, attention_stages)
        if temporal_stride_stem < 1:
            raise ValueError(f"temporal_stride_stem must be >= 1, got {temporal_stride_stem}")
        self.in_channels = in_channels
        # Same layout as torchvision's BasicStem so keys read stem.0 / stem.1.
        self.stem = nn.Sequential(
            nn.Conv3d(
                in_channels,
                width,
                kernel_size=(3, 7, 7),
                stride=(temporal_stride_stem, 2, 2),
                padding=(1, 3, 3),
                bias=False,
            ),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        self._inplanes = width
        channels = [width * m for m in (1, 2, 4, 8)]
        self.layer1 = self._make_layer(channels[0], layers[0], stride=1)
        self.layer2 = self._make_layer(channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(channels[3], layers[3], stride=2)
        _init_weights([self.stem, self.layer1, self.layer2, self.layer3, self.layer4])

        self.attention = nn.ModuleList(
            make_attention(attention if i + 1 in attention_stages else "none", c, dims=3)  # type: ignore[arg-type]
            for i, c in enumerate(channels)
        )
        self.avgpool = nn.AdaptiveAvgPool3d((1, _check_grid(pool_grid), _check_grid(pool_grid)))
        self.out_features = channels[-1] * pool_grid**2

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One R3D stage, as in ``torchvision.models.video.VideoResNet._make_layer``."""
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(
                    self._inplanes,
                    planes,
                    kernel_size=1,
                    stride=Conv3DSimple.get_downsample_stride(stride),
                    bias=False,
                ),
                nn.BatchNorm3d(planes),
            )
        modules = [BasicBlock3D(self._inplanes, planes, Conv3DSimple, stride, downsample)]
        self._inplanes = planes
        modules += [BasicBlock3D(planes, planes, Conv3DSimple) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """Map clips (B, C, T, H, W) to pooled features (B, out_features)."""
        _check_input(x, ndim=5, in_channels=self.in_channels, name="ResNet3D", layout="(B, C, T, H, W)")
        x = self.stem(x)
        for layer, attn in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.attention):
            x = attn(layer(x))
        return torch.flatten(self.avgpool(x), 1)


# Source-key prefixes we take from each torchvision checkpoint; everything else
# (the classifier ``fc.*``) is skipped. Our modules use the same names, so the
# mapping is the identity on these prefixes.
_PREFIXES = {
    "resnet18": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
    "r3d_18": ("stem.0.", "stem.1.", "layer1.", "layer2.", "layer3.", "layer4."),
}
_FIRST_CONV = {"resnet18": "conv1.weight", "r3d_18": "stem.0.weight"}
_BUILDERS = {"resnet18": "torchvision.models.resnet18", "r3d_18": "torchvision.models.video.r3d_18"}


def _map_key(src_key: str, kind: str) -> str | None:
    """Map a torchvision key to ours, or None for keys we do not use."""
    return src_key if src_key.startswith(_PREFIXES[kind]) else None


def _adapt_first_conv(weight: Tensor, target_shape: torch.Size) -> Tensor | None:
    """Adapt an RGB first-conv kernel to another number of input channels.

    The RGB kernel is averaged over its input channels and repeated, scaled by
    ``3 / in_channels`` so a grey input yields the same pre-activation as with the
    original kernel (the usual trick, cf. timm's ``adapt_input_conv``).
    Returns None when the kernels differ in anything but the input channels.
    """
    if weight.ndim != len(target_shape) or weight.shape[1] != 3:
        return None
    if weight.shape[:1] + weight.shape[2:] != target_shape[:1] + target_shape[2:]:
        return None
    in_channels = target_shape[1]
    repeats = [1, in_channels] + [1] * (weight.ndim - 2)
    return weight.mean(dim=1, keepdim=True).repeat(*repeats) * (3.0 / in_channels)


def load_pretrained(
    module: ResNet2D | ResNet3D,
    path: str | os.PathLike[str],
    *,
    kind: Literal["resnet18", "r3d_18"],
) -> tuple[list[str], list[str]]:
    """Load a local torchvision ``resnet18`` / ``r3d_18`` state_dict into a backbone.

    Nothing is downloaded: save the weights once elsewhere, e.g.
    ``torch.save(torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict(), path)``.
    Tensors whose shapes differ are skipped (``width != 64``, the small-input stem),
    except the first conv with ``in_channels != 3``, which is adapted by averaging
    the RGB kernel over channels and repeating it (see :func:`_adapt_first_conv`).
    Attention modules are not in torchvision checkpoints and keep their init.

    Args:
        module: A :class:`ResNet2D` (``kind="resnet18"``) or :class:`ResNet3D`
            (``kind="r3d_18"``).
        path: Path to a file written by ``torch.save(model.state_dict(), path)``.
        kind: Which torchvision architecture the file holds.

    Returns:
        ``(loaded_keys, skipped_keys)``: our parameter/buffer names that were
        filled, and the checkpoint keys that were not used (``fc.*`` and shape
        mismatches).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``kind`` is unknown or does not match the module type.
    """
    if kind not in _PREFIXES:
        raise ValueError(f"kind must be one of {list(_PREFIXES)}, got {kind!r}")
    expected = ResNet2D if kind == "resnet18" else ResNet3D
    if not isinstance(module, expected):
        raise ValueError(f"kind={kind!r} weights need a {expected.__name__}, got {type(module).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file not found: {path}. Pass the path of a local {kind} state_dict "
            f"saved with torch.save({_BUILDERS[kind]}(weights=...).state_dict(), path), "
            "or None to train from scratch (weights are never downloaded)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)

    own = module.state_dict()
    to_load: dict[str, Tensor] = {}
    loaded: list[str] = []
    skipped: list[str] = []
    for src_key, tensor in state.items():
        dst_key = _map_key(src_key, kind)
        if dst_key is None or dst_key not in own:
            skipped.append(src_key)
            continue
        target_shape = own[dst_key].shape
        if tensor.shape != target_shape:
            adapted = _adapt_first_conv(tensor, target_shape) if src_key == _FIRST_CONV[kind] else None
            if adapted is None:
                log.debug("skip %s: checkpoint %s vs model %s", src_key, tuple(tensor.shape), tuple(target_shape))
                skipped.append(src_key)
                continue
            tensor = adapted
        to_load[dst_key] = tensor
        loaded.append(dst_key)
    # strict=False: attention parameters (and skipped tensors) keep their init.
    module.load_state_dict(to_load, strict=False)
    log.info("Loaded %d tensors from %s (%s); skipped %d", len(loaded), path, kind, len(skipped))
    return loaded, skipped
