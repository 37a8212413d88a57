"""STSTNet: Shallow Triple Stream Three-dimensional CNN (pure ``nn.Module``).

Implements the MEGC 2019 reference network of Liong et al., "Shallow Triple Stream
Three-dimensional CNN (STSTNet) for Micro-expression Recognition" (FG 2019, arXiv 1902.03634).
The "three-dimensional" input is the 3-channel optical-flow image (u, v, optical strain) of the
onset->apex motion, 28 x 28 in the paper.

Data flow::

    x2d (B, 3, H, W) -> stream_k: Conv 3x3 (3 | 5 | 8 filters) -> ReLU -> [BN] -> MaxPool 3x3/3 -> Dropout
                     -> concat (16 channels) -> AvgPool 2x2/2 -> [AdaptiveAvgPool 5x5] -> flatten (400)
                     -> Linear -> emotion (B, num_classes)   [+ Linear -> au (B, num_aus)]

Design source: the paper's Fig. 2/Table (three parallel 3x3 conv layers with 3, 5 and 8 filters on
the same 3-channel input, 3x3 max pooling with stride 3, 2x2 average pooling, one fully connected
layer) and the authors' group's PyTorch port (christy1206 repositories, used with HTNet), which also
fixes what the paper leaves implicit: ReLU then batch norm, max pooling with padding 1, dropout 0.5
after each stream, a 5 x 5 x 16 = 400-feature FC input at 28 px. That port pads the convs by 2
(28 -> 30 -> 10 -> 5); we use "same" padding 1 (28 -> 28 -> 10 -> 5), the MATLAB original's
convention, with identical output sizes. Other sizes: the adaptive 5 x 5 average pooling before
the FC is an identity at 28 px and keeps the FC at 400 inputs at any other size (e.g. 48 px:
16 -> 8 -> 5), so one architecture serves every ``image_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Filters of the three streams (paper).
_STREAMS = (3, 5, 8)
# Spatial size of the pooled map at the paper's 28 x 28 input: 28 -> maxpool/3 -> 10 -> avgpool/2 -> 5.
_GRID = 5


class STSTNet(nn.Module):
    """Three shallow parallel conv streams on an optical-flow image, then one linear layer.

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs (used only with ``au_head``).
        in_channels: Input channels (3: u, v, strain).
        au_head: Add a linear AU head on the same 400 features (output ``au_2d``).
        batch_norm: Batch norm after each stream's ReLU (the PyTorch port has it).
        dropout: Dropout after each stream's max pooling (port: 0.5).

    Raises:
        ValueError: If ``au_head`` is set with ``num_aus < 1``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_aus: int = 0,
        in_channels: int = 3,
        au_head: bool = False,
        batch_norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if au_head and num_aus < 1:
            raise ValueError(f"au_head=True needs num_aus >= 1, got {num_aus}")
        self.in_channels = in_channels
        self.streams = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, filters, 3, padding=1), nn.ReLU(inplace=True),
                nn.BatchNorm2d(filters) if batch_norm else nn.Identity(),
                nn.MaxPool2d(3, stride=3, padding=1), nn.Dropout(dropout),
            )
            for filters in _STREAMS
        )
        self.pool = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.AdaptiveAvgPool2d(_GRID))
        features = sum(_STREAMS) * _GRID * _GRID
        self.fc = nn.Linear(features, num_classes)
        self.au = nn.Linear(features, num_aus) if au_head else None

    def forward(self, x2d: Tensor | None = None, x3d: Tensor | None = None) -> dict[str, Tensor]:
        """Return ``emotion`` = ``emotion_2d`` (B, num_classes) [and ``au_2d`` (B, num_aus)].

        Args:
            x2d: (B, in_channels, H, W) flow images; H, W >= 4.
            x3d: Ignored (keyword kept so the LightningModule calls every model alike).

        Raises:
            ValueError: If ``x2d`` is missing or has the wrong shape.
        """
        if x2d is None or x2d.ndim != 4 or x2d.shape[1] != self.in_channels:
            got = None if x2d is None else tuple(x2d.shape)
            raise ValueError(f"STSTNet expects x2d of shape (B, C={self.in_channels}, H, W) "
                             f"(u, v, strain), got {got}")
        features = self.pool(torch.cat([stream(x2d) for stream in self.streams], dim=1)).flatten(1)
        emotion = self.fc(features)
        out = {"emotion": emotion, "emotion_2d": emotion}
        if self.au is not None:
            out["au_2d"] = self.au(features)
        return out
