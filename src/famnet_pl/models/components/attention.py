"""Channel/spatial attention modules for the 2D and 3D ResNet branches.

Implements:
    * CBAM (Woo et al., ECCV 2018): channel attention followed by spatial attention.
      Data flow: ``x -> x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``
      ``-> x * sigmoid(conv([mean_c(x), max_c(x)]))``. The 3D variant pools over
      (T, H, W) for the channel gate and applies a 3D conv over (T, H, W) for the
      spatial(-temporal) gate.
    * SE (Hu et al., CVPR 2018): ``x -> x * sigmoid(MLP(avgpool(x)))``.
    * ``none``: identity, for ablations.

Design source: FAMNet (arXiv 2508.13483) uses "hierarchical attention" in both
branches but leaves the exact module open; CBAM is our default because it gates
both channels and locations, and micro-expressions are small, localised
motions. The MLPs are written with 1x1 convolutions so the same code serves
2D and 3D inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

ATTENTION_KINDS: tuple[str, ...] = ("cbam", "se", "none")

# Smallest hidden size of the channel MLP: with tiny CI widths (8 channels) and
# reduction 16 the bottleneck would otherwise collapse to 0 units.
_MIN_HIDDEN = 4


def _conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """Return the convolution class for 2D or 3D feature maps."""
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _hidden(channels: int, reduction: int) -> int:
    """Hidden width of the channel-gating MLP, clamped so tiny widths work."""
    return max(channels // reduction, _MIN_HIDDEN)


class ChannelAttention(nn.Module):
    """CBAM channel gate: shared MLP on global average- and max-pooled descriptors.

    Args:
        channels: Number of input channels.
        dims: 2 for (B, C, H, W) inputs, 3 for (B, C, T, H, W) inputs.
        reduction: Channel reduction ratio of the MLP bottleneck.
    """

    def __init__(self, channels: int, *, dims: Literal[2, 3], reduction: int = 16) -> None:
        super().__init__()
        conv = _conv(dims)
        hidden = _hidden(channels, reduction)
        self.dims = dims
        self.mlp = nn.Sequential(
            conv(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            conv(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel of ``x`` by a gate in (0, 1)."""
        spatial = tuple(range(2, 2 + self.dims))  # (H, W) or (T, H, W)
        avg = x.mean(dim=spatial, keepdim=True)
        mx = x.amax(dim=spatial, keepdim=True)
        gate = torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        return x * gate


class SpatialAttention(nn.Module):
    """CBAM spatial gate: conv over the channel-wise mean and max maps.

    Args:
        dims: 2 for (B, C, H, W) inputs, 3 for (B, C, T, H, W) inputs.
        kernel_size: Spatial kernel size (7 as in CBAM). In 3D the temporal
            extent is 3, since clips are short (8-16 frames) and deep stages
            have only 1-2 time steps left.
    """

    def __init__(self, *, dims: Literal[2, 3], kernel_size: int = 7) -> None:
        super().__init__()
        pad = kernel_size // 2
        if dims == 2:
            self.conv: nn.Module = nn.Conv2d(2, 1, kernel_size, padding=pad, bias=False)
        else:
            self.conv = nn.Conv3d(2, 1, (3, kernel_size, kernel_size), padding=(1, pad, pad), bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Scale each location of ``x`` by a gate in (0, 1) shared over channels."""
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate then spatial gate.

    Args:
        channels: Number of input channels.
        dims: 2 or 3 (see :class:`ChannelAttention`).
        reduction: Channel reduction ratio of the MLP bottleneck.
    """

    def __init__(self, channels: int, *, dims: Literal[2, 3], reduction: int = 16) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, dims=dims, reduction=reduction)
        self.spatial = SpatialAttention(dims=dims)

    def forward(self, x: Tensor) -> Tensor:
        """Apply channel then spatial attention (the order CBAM found best)."""
        return self.spatial(self.channel(x))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation channel gate (average pooling only, with biases).

    Args:
        channels: Number of input channels.
        dims: 2 or 3 (see :class:`ChannelAttention`).
        reduction: Channel reduction ratio of the MLP bottleneck.
    """

    def __init__(self, channels: int, *, dims: Literal[2, 3], reduction: int = 16) -> None:
        super().__init__()
        conv = _conv(dims)
        hidden = _hidden(channels, reduction)
        self.dims = dims
        self.mlp = nn.Sequential(
            conv(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            conv(hidden, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel of ``x`` by a gate in (0, 1)."""
        spatial = tuple(range(2, 2 + self.dims))
        return x * torch.sigmoid(self.mlp(x.mean(dim=spatial, keepdim=True)))


def make_attention(
    kind: Literal["cbam", "se", "none"],
    channels: int,
    *,
    dims: Literal[2, 3],
    reduction: int = 16,
) -> nn.Module:
    """Build an attention module that preserves the input shape.

    Args:
        kind: ``"cbam"``, ``"se"`` or ``"none"`` (identity).
        channels: Number of channels of the feature map it will gate.
        dims: 2 for (B, C, H, W) maps, 3 for (B, C, T, H, W) maps.
        reduction: Channel reduction ratio; the hidden size is clamped to >= 4.

    Returns:
        The attention module.

    Raises:
        ValueError: If ``kind`` or ``dims`` is not one of the supported values.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    if kind == "cbam":
        return CBAM(channels, dims=dims, reduction=reduction)
    if kind == "se":
        return SqueezeExcitation(channels, dims=dims, reduction=reduction)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown attention kind {kind!r}; choose one of {list(ATTENTION_KINDS)}")
