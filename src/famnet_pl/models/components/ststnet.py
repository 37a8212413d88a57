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

import copy

import torch
from torch import Tensor, nn

# Filters of the three streams (paper).
STREAMS = (3, 5, 8)
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

    #: The batch views it reads (the DataModule builds no others): the flow image.
    inputs = ("x2d",)

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
            for filters in STREAMS
        )
        self.pool = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.AdaptiveAvgPool2d(_GRID))
        features = sum(STREAMS) * _GRID * _GRID
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


class StackedSTSTNet(nn.Module):
    """K independent STSTNets computed as one network: fold k's copy sees channel group k only.

    Every layer of STSTNet acts per sample and, except the convolutions and the linear layer, per
    channel; so K copies stack exactly. The three streams' convolutions read the same input, so
    per copy they are one convolution with 3 + 5 + 8 = 16 filters (in the order STSTNet
    concatenates them), and the K copies one grouped convolution (``groups=K``, channels-last,
    which oneDNN's grouped kernels want); batch norm and pooling run over the K x 16 channels (each
    belongs to one copy) and the linear layer is a batched matrix product. K small networks then
    cost one network's kernel launches (the LOSO runner's ``--stack-folds``).

    Data flow::

        x (B, K, 3, H, W), copy k's batch in [:, k] -> (B, K*3, H, W) -> conv 3x3 (K*16, groups=K)
            -> ReLU -> batch norm (statistics of the full map, applied after pooling) -> MaxPool 3/3
            -> Dropout -> AvgPool 2/2 -> AdaptiveAvgPool 5
            -> per copy (B, K, 400) -> per-copy Linear -> logits (B, K, num_classes)

    Batch norm in training mode averages over the samples that ``mask`` marks for each copy (copies
    may have fewer real samples in a step than others: the rest are padding and change nothing, not
    even the running statistics of a copy with none).

    Args:
        nets: the K networks to stack (same options; their weights are copied): :meth:`unstack`
            gives them back with the trained weights.
    """

    def __init__(self, nets: list[STSTNet]) -> None:
        super().__init__()
        first = nets[0]
        if first.au is not None:
            raise ValueError("StackedSTSTNet stacks the emotion head only: build the nets with au_head=False")
        self.k, self.in_channels = len(nets), first.in_channels
        self.templates = [first]  # a plain list: not a submodule (unstack copies into fresh ones)

        self.batch_norm = not isinstance(first.streams[0][2], nn.Identity)
        # Each copy's weights are its own leaf tensors (``copies[k]``), stacked in forward: an
        # optimiser then keeps each copy's state apart (Adam's step count, for its bias correction,
        # included), and a copy whose gradients are None skips a step as a sequential run would.
        self.copies = nn.ModuleList([_CopyWeights(n, self.batch_norm) for n in nets])
        if self.batch_norm:  # the running statistics stay stacked: batch norm updates them in place
            self.register_buffer("bn_mean", torch.cat([_streams(n, 2, "running_mean") for n in nets]))
            self.register_buffer("bn_var", torch.cat([_streams(n, 2, "running_var") for n in nets]))
            self.bn_momentum, self.bn_eps = first.streams[0][2].momentum, first.streams[0][2].eps
        self.dropout = first.streams[0][4].p
        self.pool = first.pool

    def stacked(self, name: str) -> Tensor:
        """The copies' ``name`` (``conv_w``, ``conv_b``, ``bn_w``, ``bn_b``: concatenated, copy k's
        16 channels at [16 k, 16 k + 16); ``fc_w``, ``fc_b``: stacked, copy k's at [k])."""
        tensors = [getattr(c, name) for c in self.copies]
        return torch.stack(tensors) if name.startswith("fc") else torch.cat(tensors)

    def _statistics(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Batch norm's per-channel mean and (biased) variance: over each copy's real samples in
        training (running statistics updated as nn.BatchNorm2d does, unbiased), running ones in eval."""
        if not self.training:
            return self.bn_mean, self.bn_var
        b, c, h, w = x.shape
        # From the sums of y and y^2 (one pass each, and cheaper backward than torch.var_mean over
        # (B, H, W) on CPU); y >= 0 after the ReLU and var is clamped, so the cancellation is harmless.
        if mask is None or bool(mask.all()):  # every copy's batch is whole
            count = torch.full((c,), float(b * h * w), device=x.device)
            total, squares = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))
        else:
            m = mask.to(x.dtype).repeat_interleave(c // self.k, dim=1)[:, :, None, None]  # (B, K*F, 1, 1)
            count = m.sum(0).flatten() * h * w  # per channel: its copy's real samples x pixels
            total, squares = (x * m).sum((0, 2, 3)), (x.square() * m).sum((0, 2, 3))
        safe = count.clamp(min=1)
        mean = total / safe
        var = (squares / safe - mean.square()).clamp(min=0)
        with torch.no_grad():
            live, momentum = count > 1, self.bn_momentum
            unbiased = var * count / (count - 1).clamp(min=1)
            for buffer, value in ((self.bn_mean, mean), (self.bn_var, unbiased)):
                buffer.copy_(torch.where(live, (1 - momentum) * buffer + momentum * value, buffer))
        return mean, var

    def forward(self, x: Tensor, mask: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, num_classes)`` of ``x`` ``(B, K, C, H, W)``.

        Args:
            x: copy k's batch in ``x[:, k]``.
            mask: ``(B, K)`` bool, the real samples of each copy (training batch norm; None: all).
            noise: ``(B, h, w, K * 16)`` uniform random bytes (uint8) for dropout after the max pooling
                (h, w: its output side; channels last, as the map is): an element is kept when its
                byte is >= 256 p, so ``p`` is rounded to 1/256 (0.5, STSTNet's, is exact). The caller
                draws them per copy, so that a copy's dropout does not depend on which copies are
                stacked beside it (and bytes cost less to draw than floats); None: ``F.dropout`` (one
                stream).
        """
        b, k, c, h, w = x.shape
        x = x.reshape(b, k * c, h, w).contiguous(memory_format=torch.channels_last)
        # Channels-last throughout: oneDNN's grouped convolution wants it, and the full-size map then
        # stays in one layout forward and backward (pooling, statistics and the ReLU's backward over
        # a map and gradient of different layouts each cost a conversion pass: 103 -> ~70 ms a step
        # for 16 copies on 2 CPU cores).
        y = torch.relu_(nn.functional.conv2d(x, self.stacked("conv_w"), self.stacked("conv_b"), padding=1,
                                             groups=k))
        if self.batch_norm:
            # Batch norm is a per-channel affine map a * y + c once its statistics are known, and max
            # pooling commutes with a monotone map: pool first, then apply it to the 9x smaller map
            # (a min-pool where a < 0). The statistics still come from the full map. Same values as
            # norm-then-pool up to rounding, with two passes over the full map fewer each way.
            mean, var = self._statistics(y, mask)
            scale = self.stacked("bn_w") / torch.sqrt(var + self.bn_eps)
            shift = (self.stacked("bn_b") - mean * scale)[None, :, None, None]
            pooled = nn.functional.max_pool2d(y, 3, stride=3, padding=1)
            if bool((scale < 0).any()):
                low = -nn.functional.max_pool2d(-y, 3, stride=3, padding=1)
                pooled = torch.where((scale >= 0)[None, :, None, None], pooled, low)
            y = pooled * scale[None, :, None, None] + shift
        else:
            y = nn.functional.max_pool2d(y, 3, stride=3, padding=1)
        if self.training and noise is not None and self.dropout:
            threshold = round(self.dropout * 256)
            keep = noise.reshape(b, *y.shape[2:], -1).permute(0, 3, 1, 2) >= threshold  # NCHW view of NHWC
            y = y * keep / (1 - threshold / 256)
        else:
            y = nn.functional.dropout(y, self.dropout, self.training)
        features = self.pool(y).reshape(b, k, -1)  # (B, K, 400): copy k's streams in STSTNet's order
        return torch.einsum("bki,kci->bkc", features, self.stacked("fc_w")) + self.stacked("fc_b")

    def unstack(self) -> list[STSTNet]:
        """The K trained networks as plain STSTNets (weights and batch-norm statistics copied)."""
        nets, per_copy = [], sum(STREAMS)
        for j, weights in enumerate(self.copies):
            net = copy.deepcopy(self.templates[0])
            stats, first = slice(j * per_copy, (j + 1) * per_copy), 0  # copy j's stacked statistics
            with torch.no_grad():
                for s, filters in enumerate(STREAMS):
                    rows = slice(first, first + filters)
                    net.streams[s][0].weight.copy_(weights.conv_w[rows])
                    net.streams[s][0].bias.copy_(weights.conv_b[rows])
                    if self.batch_norm:
                        bn = net.streams[s][2]
                        bn.weight.copy_(weights.bn_w[rows])
                        bn.bias.copy_(weights.bn_b[rows])
                        bn.running_mean.copy_(self.bn_mean[stats][rows])
                        bn.running_var.copy_(self.bn_var[stats][rows])
                    first += filters
                net.fc.weight.copy_(weights.fc_w)
                net.fc.bias.copy_(weights.fc_b)
            nets.append(net)
        return nets


class _CopyWeights(nn.Module):
    """One STSTNet copy's trainable weights in StackedSTSTNet's layout: its three streams'
    convolution (and batch-norm affine) parameters as 16 rows in STSTNet's stream order, and its
    linear layer."""

    def __init__(self, net: STSTNet, batch_norm: bool) -> None:
        super().__init__()
        self.conv_w, self.conv_b = (nn.Parameter(_streams(net, 0, name)) for name in ("weight", "bias"))
        if batch_norm:
            self.bn_w, self.bn_b = (nn.Parameter(_streams(net, 2, name)) for name in ("weight", "bias"))
        self.fc_w = nn.Parameter(net.fc.weight.detach().clone())  # (C, 400)
        self.fc_b = nn.Parameter(net.fc.bias.detach().clone())


def _streams(net: STSTNet, layer: int, name: str) -> Tensor:
    """A copy of ``net``'s three streams' ``layer`` tensor ``name`` as one: 16 rows in STSTNet's
    stream order (StackedSTSTNet's per-copy channel layout)."""
    return torch.cat([getattr(net.streams[s][layer], name).detach() for s in range(len(STREAMS))]).clone()
