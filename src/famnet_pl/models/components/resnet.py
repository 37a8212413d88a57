"""ResNet backbones (2D from timm, 3D from torchvision) with hierarchical attention, and their weights.

Implements:
    * :class:`ResNet2D`: timm's ResNet18/34 for a static image (FAMNet's AMNet2D backbone, fed the
      apex frame or another single-image view), with attention after its stages.
    * :class:`ResNet3D`: torchvision's video ResNets (``r3d_18``, ``mc3_18``, ``r2plus1d_18``) for a
      frame clip (FAMNet's AMNet3D backbone), with attention after its stages.
    * Weights: :func:`load_pretrained` copies a *local* state_dict file into either backbone;
      :func:`create_timm_model` / :func:`create_video_resnet` get the libraries' own pretrained
      weights (Hugging Face hub / torch hub), from their caches first, and raise
      :class:`PretrainedWeightsError` with a one-line fix when offline and not cached.

Data flow (both backbones)::

    stem -> [stage_i -> attention_i] x 4 -> avgpool (pool_grid) -> flatten -> (B, width * 8 * pool_grid**2)

where ``attention_i`` is a CBAM/SE module for stages listed in ``attention_stages``
and identity otherwise ("hierarchical attention": gating at several depths).

What the paper fixes and what we chose: FAMNet (arXiv 2508.13483) uses ResNet18 in both
branches plus attention modules, and nothing more specific. The 2D network is timm's
``resnet18`` (same topology and parameter names as torchvision's: ``conv1``/``bn1``/``layer1..4``),
the 3D one torchvision's ``r3d_18`` (``stem.0``/``stem.1``/``layer1..4``); at width 64 their
modules are taken from the libraries' builders, so ImageNet / Kinetics-400 weights load by
name, and at other widths (CPU demos, CI) the same topology is assembled from the libraries'
own block classes. Attention placement is not specified by the paper, see ``attention.py``;
``resnet34``, ``mc3_18`` and ``r2plus1d_18``, the small-input stem and ``pool_grid`` are ours.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import make_blocks
from torch import Tensor, nn
from torchvision.models import video as tv_video
from torchvision.models.video.resnet import BasicBlock as BasicBlock3D
from torchvision.models.video.resnet import Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple, VideoResNet

from famnet_pl.models.components.attention import make_attention

log = logging.getLogger(__name__)

_NUM_STAGES = 4
# The width of the libraries' ResNets: the only one their pretrained weights fit.
LIBRARY_WIDTH = 64
VideoArch = Literal["r3d_18", "mc3_18", "r2plus1d_18"]
# timm ResNets with BasicBlocks, whose stages ResNet2D takes (other timm models: TimmBackbone2D).
RESNET_LAYERS_2D: dict[str, tuple[int, int, int, int]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
# How long to wait for a download host before reporting "no network" (instead of the libraries'
# retries: timm/huggingface_hub takes ~50 s to give up without HF_HUB_OFFLINE).
_PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsError(RuntimeError):
    """Library weights were asked for but are neither cached nor downloadable.

    The message is one line saying what to download and where to put it.
    """


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


def _stage_attention(
    attention: str, attention_stages: Sequence[int], channels: Sequence[int], *, dims: Literal[2, 3]
) -> nn.ModuleList:
    """One attention module per stage; identity for stages not in ``attention_stages``."""
    kinds = [attention if i + 1 in attention_stages else "none" for i in range(len(channels))]
    modules = (make_attention(k, c, dims=dims) for k, c in zip(kinds, channels))  # type: ignore[arg-type]
    return nn.ModuleList(modules)


def _check_pretrained_topology(
    name: str, *, width: int, layers: Sequence[int], library_layers: Sequence[int]
) -> None:
    if width != LIBRARY_WIDTH or tuple(layers) != tuple(library_layers):
        raise ValueError(
            f"pretrained {name} weights need width={LIBRARY_WIDTH} and layers={tuple(library_layers)}, "
            f"got width={width}, layers={tuple(layers)}; use width {LIBRARY_WIDTH} or no pretrained weights"
        )


# --------------------------------------------------------------------------------------------------
# Library weights: cache first, then download, else one line saying what to fetch.
# --------------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` when downloads are forbidden, else None.

    HF_HUB_OFFLINE is the project's "no network at run time" switch (the Makefile exports it); it
    is read here at call time (huggingface_hub reads it once, at import) and also governs the
    torch hub download, which has no switch of its own.
    """
    return "HF_HUB_OFFLINE=1" if _env_true("HF_HUB_OFFLINE") else None


def _unreachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None if ``url``'s host (or the configured https proxy) takes a TCP connection, else why not.

    A cheap probe before the libraries' own downloads, which retry for up to a minute on a
    machine without network. The connect runs in a daemon thread so a hanging DNS lookup is
    bounded by ``timeout`` too.
    """
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port} unreachable: {exc}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port} unreachable: no answer in {timeout:.0f} s"


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (``$HF_HOME/hub`` by default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return Path(os.environ.get("HF_HOME", xdg / "huggingface")).expanduser() / "hub"


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` caches the file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_cached_file(hf_hub_id: str, hf_hub_filename: str | None, cache_dir: Path) -> str | None:
    """Path of the cached weight file timm would download for ``hf_hub_id``, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    filename = hf_hub_filename or "pytorch_model.bin"
    # timm prefers a safetensors twin of the .bin file (timm.models._hub.load_state_dict_from_hf).
    stem = "model" if filename == "pytorch_model.bin" else os.path.splitext(filename)[0]
    safe = f"{stem}.safetensors"
    for candidate in dict.fromkeys((safe, filename)):
        found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    file: str | os.PathLike[str] | None = None,
    option: str = "pretrained_2d",
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` that finds pretrained weights in the caches before touching the network.

    With ``pretrained=True``: a weight file in the Hugging Face cache (or, for timm models without a
    hub id, the torch hub cache) is handed to timm as ``pretrained_cfg_overlay={"file": ...}``, so a
    cached run needs no network at all; otherwise timm downloads it into that cache, unless
    HF_HUB_OFFLINE=1 or the hub is unreachable. With ``file``: timm loads that local file.
    Either way timm's own loader adapts the first conv to ``in_chans`` and drops the classifier.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet18.tv_in1k``).
        pretrained: Load timm's default weights for ``name``.
        file: Load this local weight file with timm's loader instead (implies pretrained).
        option: Config option named in error messages.
        **kwargs: Passed to ``timm.create_model`` (``in_chans``, ``num_classes``, ``features_only``...).

    Raises:
        PretrainedWeightsError: Weights neither cached nor downloadable (one line: what to fetch, where).
        ValueError: timm has no pretrained weights for ``name``.
    """
    if file is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"{option}=imagenet: timm has no pretrained weights for {name!r}")
    cache_dir = hf_hub_cache_dir()
    if cfg.hf_hub_id:
        cached = _hf_cached_file(cfg.hf_hub_id, cfg.hf_hub_filename, cache_dir)
        repo_id = cfg.hf_hub_id.partition("@")[0]
        where = cache_dir / f"models--{repo_id.replace('/', '--')}"
        url = f"https://huggingface.co/{repo_id}"
        probe = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        what = (f"timm {name} weights (Hugging Face repo {repo_id}) are not in the Hugging Face cache "
                f"({where})")
        command = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
        fix = (
            f"on a networked machine run {command} "
            f"and copy its $HF_HOME/hub/{where.name} folder to {where}, or download "
            f"{url}/resolve/main/model.safetensors and pass it: --model.net.{option}=/path/model.safetensors"
        )
    else:
        path = torch_hub_checkpoint(cfg.url)
        cached = str(path) if path.is_file() else None
        probe = url = cfg.url
        what = f"timm {name} weights are not in the torch hub cache ({path})"
        fix = f"download {url} to {path} (or pass a local file: --model.net.{option}=/path/{path.name})"
    if cached is not None:
        log.info("%s=imagenet: timm %s weights from the cache: %s", option, name, cached)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)

    reason = _offline_reason() or _unreachable(probe)
    if reason is None:
        try:
            return timm.create_model(name, pretrained=True, cache_dir=cache_dir, **kwargs)
        except OSError as exc:  # huggingface_hub / urllib errors are OSErrors
            reason = f"download failed: {_one_line(exc)}"
    raise PretrainedWeightsError(f"{option}=imagenet: {what} and there is no network ({reason}); {fix}")


@dataclass(frozen=True)
class _VideoArchSpec:
    """A torchvision video ResNet: its builder, weights enum, per-stage convs and stem kind."""

    builder: Callable[..., VideoResNet]
    weights: Any
    conv_makers: tuple[type[nn.Module], ...]
    factorised_stem: bool  # R(2+1)D: (1, 7, 7) spatial then (3, 1, 1) temporal conv


_VIDEO_ARCHS: dict[str, _VideoArchSpec] = {
    "r3d_18": _VideoArchSpec(tv_video.r3d_18, tv_video.R3D_18_Weights, (Conv3DSimple,) * 4, False),
    "mc3_18": _VideoArchSpec(
        tv_video.mc3_18, tv_video.MC3_18_Weights, (Conv3DSimple,) + (Conv3DNoTemporal,) * 3, False
    ),
    "r2plus1d_18": _VideoArchSpec(
        tv_video.r2plus1d_18, tv_video.R2Plus1D_18_Weights, (Conv2Plus1D,) * 4, True
    ),
}


def _video_arch(arch: str) -> _VideoArchSpec:
    if arch not in _VIDEO_ARCHS:
        raise ValueError(f"3D backbone must be one of {list(_VIDEO_ARCHS)}, got {arch!r}")
    return _VIDEO_ARCHS[arch]


def create_video_resnet(
    arch: VideoArch, *, pretrained: bool = False, option: str = "pretrained_3d"
) -> VideoResNet:
    """torchvision's ``r3d_18`` / ``mc3_18`` / ``r2plus1d_18``, with Kinetics-400 weights if ``pretrained``.

    torchvision loads ``$TORCH_HOME/hub/checkpoints/<file>`` when it is there (no network, no hash
    check) and downloads it otherwise; offline (HF_HUB_OFFLINE=1 or host unreachable) with nothing
    cached this raises at once instead.

    Raises:
        PretrainedWeightsError: Weights neither cached nor downloadable (one line: what to fetch, where).
    """
    spec = _video_arch(arch)
    if not pretrained:
        return spec.builder(weights=None)
    weights = spec.weights.KINETICS400_V1
    path = torch_hub_checkpoint(weights.url)
    if path.is_file():
        log.info("%s=kinetics400: %s weights from the cache: %s", option, arch, path)
        return spec.builder(weights=weights)
    reason = _offline_reason() or _unreachable(weights.url)
    if reason is None:
        try:
            return spec.builder(weights=weights)
        except OSError as exc:  # urllib.error.URLError / HTTPError
            reason = f"download failed: {_one_line(exc)}"
    raise PretrainedWeightsError(
        f"{option}=kinetics400: {arch} Kinetics-400 weights are not in the torch hub cache ({path}) "
        f"and there is no network ({reason}); download {weights.url} to {path} "
        f"(or pass a local file: --model.net.{option}=/path/{arch}.pth)"
    )


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


class ResNet2D(nn.Module):
    """timm ResNet18/34 2D backbone with attention after selected stages.

    At width 64 the stem and stages are those of ``timm.create_model(arch)`` (ImageNet weights
    with ``pretrained=True``); at other widths the same topology is built from timm's
    ``BasicBlock`` / ``make_blocks``. Parameter names are torchvision's and timm's
    (``conv1``, ``bn1``, ``layer1..4``) plus ``attention.i``.

    Args:
        arch: ``"resnet18"`` or ``"resnet34"``, optionally with a timm pretrained tag
            (``"resnet18.tv_in1k"``: torchvision's ImageNet weights; default tag ``a1_in1k``).
        in_channels: Input image channels (3 for RGB; e.g. 6 for two stacked frames).
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
            64 is ResNet18/34.
        layers: BasicBlocks per stage; None = the architecture's (``(2, 2, 2, 2)`` for ResNet18).
        attention: ``"cbam"``, ``"se"`` or ``"none"`` (see ``attention.py``).
        attention_stages: 1-based stages followed by an attention module.
        small_input: Use a 3x3 stride-1 stem without maxpool (CIFAR-style) so
            32-64 px faces are not downsampled 4x before the first stage. The stem
            then no longer matches ImageNet weights (``conv1`` stays randomly initialised).
        pool_grid: Final pooling to a ``pool_grid x pool_grid`` grid instead of one global
            average (1, as in ResNet18). On aligned faces *where* the motion is tells the AU;
            global pooling throws that away, a coarse grid keeps it.
        pretrained: Load timm's ImageNet weights for ``arch`` (cache first, see
            :func:`create_timm_model`); needs width 64 and the architecture's layers.

    Attributes:
        out_features: Size of the pooled feature vector (``width * 8 * pool_grid**2``).
        arch: The architecture without tag (``"resnet18"``).
    """

    def __init__(
        self,
        *,
        arch: str = "resnet18",
        in_channels: int = 3,
        width: int = 64,
        layers: tuple[int, int, int, int] | None = None,
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        small_input: bool = False,
        pool_grid: int = 1,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        base = split_model_name_tag(arch)[0]
        if base not in RESNET_LAYERS_2D:
            raise ValueError(
                f"ResNet2D arch must be one of {list(RESNET_LAYERS_2D)} (+ optional .tag), got {arch!r}"
            )
        layers = tuple(layers) if layers is not None else RESNET_LAYERS_2D[base]  # type: ignore[assignment]
        _check_stages(layers, attention_stages)  # type: ignore[arg-type]
        if pretrained:
            _check_pretrained_topology(arch, width=width, layers=layers,
                                       library_layers=RESNET_LAYERS_2D[base])
        self.arch = base
        self.in_channels = in_channels
        self.small_input = small_input
        channels = [width * m for m in (1, 2, 4, 8)]

        if width == LIBRARY_WIDTH:
            # zero_init_last=False: torchvision's init (BN gamma = 1 everywhere), as before timm.
            net = create_timm_model(arch, pretrained=pretrained, in_chans=in_channels, num_classes=0,
                                    layers=layers, zero_init_last=False)
            self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
            stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        else:
            # timm's ResNet always has a 64-channel 7x7 stem; build the stem here, the stages with timm.
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.act1 = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            named, _ = make_blocks((TimmBasicBlock,) * _NUM_STAGES, tuple(channels), layers, width,
                                   act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d)
            stages = [stage for _, stage in named]
            # Only the backbone gets the ResNet init; attention keeps PyTorch defaults
            # (Kaiming fan_out on the tiny CBAM spatial conv would saturate its sigmoid).
            _init_weights([self.conv1, self.bn1, *stages])
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            _init_weights([self.conv1])
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.attention = _stage_attention(attention, attention_stages, channels, dims=2)
        self.avgpool = nn.AdaptiveAvgPool2d(_check_grid(pool_grid))
        self.out_features = channels[-1] * pool_grid**2

    def forward(self, x: Tensor) -> Tensor:
        """Map images (B, C, H, W) to pooled features (B, out_features)."""
        _check_input(x, ndim=4, in_channels=self.in_channels, name="ResNet2D", layout="(B, C, H, W)")
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for layer, attn in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.attention):
            x = attn(layer(x))
        return torch.flatten(self.avgpool(x), 1)


class _VideoStages:
    """Stand-in ``self`` for ``VideoResNet._make_layer``, which reads and advances ``inplanes``.

    ``VideoResNet.__init__`` fixes ``inplanes`` at 64; borrowing its ``_make_layer`` gives the
    same stages (blocks, downsample strides per conv type) at any width.
    """

    make_layer = VideoResNet._make_layer

    def __init__(self, inplanes: int) -> None:
        self.inplanes = inplanes


def _video_stem(*, in_channels: int, width: int, temporal_stride: int, factorised: bool) -> nn.Sequential:
    """torchvision's ``BasicStem`` / ``R2Plus1dStem`` layout at any width, input channels, temporal stride.

    The temporal stride goes on the conv with temporal extent (the only one in R(2+1)D's second
    conv). R(2+1)D's 45 mid channels at width 64 scale with the width.
    """
    if not factorised:
        return nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 7, 7), stride=(temporal_stride, 2, 2), padding=(1, 3, 3),
                      bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
    mid = max(1, round(45 * width / LIBRARY_WIDTH))
    return nn.Sequential(
        nn.Conv3d(in_channels, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, (3, 1, 1), stride=(temporal_stride, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class ResNet3D(nn.Module):
    """torchvision video ResNet 3D backbone (R3D-18, MC3-18, R(2+1)D-18) with attention after stages.

    At width 64 and (2, 2, 2, 2) blocks the stages are those of torchvision's builder
    (``torchvision.models.video.r3d_18(weights=...)``; Kinetics-400 weights with
    ``pretrained=True``), and the stem is rebuilt in torchvision's layout with the builder's
    weights (the first conv adapted to ``in_channels``). At other widths the same topology is
    assembled from torchvision's ``BasicBlock`` / conv classes via ``VideoResNet._make_layer``.
    Parameter names are torchvision's (``stem.*``, ``layer1..4``) plus ``attention.i``.

    Args:
        arch: ``"r3d_18"`` (3D convs throughout), ``"mc3_18"`` (3D convs in stage 1, 2D after)
            or ``"r2plus1d_18"`` (each 3x3x3 conv factorised into spatial + temporal).
        in_channels: Input channels per frame (3 for RGB).
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
            64 is torchvision's.
        layers: 3D BasicBlocks per stage; ``(2, 2, 2, 2)`` is the 18-layer network.
        attention: ``"cbam"``, ``"se"`` or ``"none"`` (3D variants, over T, H, W).
        attention_stages: 1-based stages followed by an attention module.
        temporal_stride_stem: Temporal stride of the stem. 1 (as in torchvision) keeps every
            frame, which matters for short, subtle clips; 2 halves compute for long clips.
        pool_grid: Final pooling: global over time, ``pool_grid x pool_grid`` over space
            (1 = global average, as in r3d_18); see ResNet2D.
        pretrained: Load torchvision's Kinetics-400 weights (torch hub cache first, see
            :func:`create_video_resnet`); needs width 64 and (2, 2, 2, 2).

    Attributes:
        out_features: Size of the pooled feature vector (``width * 8 * pool_grid**2``).
        arch: The architecture name.
    """

    def __init__(
        self,
        *,
        arch: VideoArch = "r3d_18",
        in_channels: int = 3,
        width: int = 64,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        attention: str = "cbam",
        attention_stages: tuple[int, ...] = (1, 2, 3, 4),
        temporal_stride_stem: int = 1,
        pool_grid: int = 1,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        spec = _video_arch(arch)
        _check_stages(layers, attention_stages)
        if temporal_stride_stem < 1:
            raise ValueError(f"temporal_stride_stem must be >= 1, got {temporal_stride_stem}")
        if pretrained:
            _check_pretrained_topology(arch, width=width, layers=layers, library_layers=(2, 2, 2, 2))
        self.arch = arch
        self.in_channels = in_channels
        channels = [width * m for m in (1, 2, 4, 8)]
        self.stem = _video_stem(in_channels=in_channels, width=width, temporal_stride=temporal_stride_stem,
                                factorised=spec.factorised_stem)
        if width == LIBRARY_WIDTH and tuple(layers) == (2, 2, 2, 2):
            net = create_video_resnet(arch, pretrained=pretrained)
            stages = [net.layer1, net.layer2, net.layer3, net.layer4]
            if pretrained:
                _load_stem(self.stem, net.stem.state_dict())
            else:
                _init_weights([self.stem])
        else:
            maker = _VideoStages(width)
            stages = [
                maker.make_layer(BasicBlock3D, conv, planes, blocks, stride=1 if i == 0 else 2)
                for i, (conv, planes, blocks) in enumerate(zip(spec.conv_makers, channels, layers))
            ]
            _init_weights([self.stem, *stages])
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.attention = _stage_attention(attention, attention_stages, channels, dims=3)
        self.avgpool = nn.AdaptiveAvgPool3d((1, _check_grid(pool_grid), _check_grid(pool_grid)))
        self.out_features = channels[-1] * pool_grid**2

    def forward(self, x: Tensor) -> Tensor:
        """Map clips (B, C, T, H, W) to pooled features (B, out_features)."""
        _check_input(x, ndim=5, in_channels=self.in_channels, name="ResNet3D", layout="(B, C, T, H, W)")
        x = self.stem(x)
        for layer, attn in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.attention):
            x = attn(layer(x))
        return torch.flatten(self.avgpool(x), 1)


def _load_stem(stem: nn.Sequential, state: dict[str, Tensor]) -> None:
    """Copy a torchvision stem's weights into ours, adapting the first conv to our input channels."""
    state = dict(state)
    target = stem[0].weight.shape
    if state["0.weight"].shape != target:
        adapted = _adapt_first_conv(state["0.weight"], target)
        if adapted is None:
            raise ValueError(f"cannot adapt stem weights {tuple(state['0.weight'].shape)} to {tuple(target)}")
        state["0.weight"] = adapted
    stem.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Local weight files
# --------------------------------------------------------------------------------------------------

LocalKind = Literal["resnet18", "resnet34", "r3d_18", "mc3_18", "r2plus1d_18"]
# Source-key prefixes we take from each checkpoint; everything else (the classifier ``fc.*``)
# is skipped. Our modules use the libraries' names, so the mapping is the identity on these.
_PREFIXES_2D = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_PREFIXES_3D = ("stem.", "layer1.", "layer2.", "layer3.", "layer4.")
_FIRST_CONV = {"2d": "conv1.weight", "3d": "stem.0.weight"}


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


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A ``torch.save``-d state_dict, or a ``.safetensors`` file (as on the Hugging Face hub)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pretrained(
    module: ResNet2D | ResNet3D,
    path: str | os.PathLike[str],
    *,
    kind: LocalKind,
) -> tuple[list[str], list[str]]:
    """Load a local ``resnet18/34`` (torchvision or timm) / torchvision video ResNet state_dict.

    Nothing is downloaded: save the weights once elsewhere, e.g.
    ``torch.save(torchvision.models.video.r3d_18(weights="KINETICS400_V1").state_dict(), path)``,
    or take timm's ``model.safetensors`` from the Hugging Face hub.
    Tensors whose shapes differ are skipped (``width != 64``, the small-input stem),
    except the first conv with ``in_channels != 3``, which is adapted by averaging
    the RGB kernel over channels and repeating it (see :func:`_adapt_first_conv`).
    Attention modules are not in the checkpoints and keep their init.

    Args:
        module: A :class:`ResNet2D` (``kind`` ``"resnet18"``/``"resnet34"``) or :class:`ResNet3D`
            (``kind`` ``"r3d_18"``/``"mc3_18"``/``"r2plus1d_18"``) of that architecture.
        path: A file written by ``torch.save(model.state_dict(), path)``, or a ``.safetensors`` file.
        kind: Which architecture the file holds.

    Returns:
        ``(loaded_keys, skipped_keys)``: our parameter/buffer names that were
        filled, and the checkpoint keys that were not used (``fc.*`` and shape
        mismatches).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``kind`` is unknown or does not match the module.
    """
    dims = "2d" if kind in RESNET_LAYERS_2D else "3d" if kind in _VIDEO_ARCHS else None
    if dims is None:
        raise ValueError(f"kind must be one of {[*RESNET_LAYERS_2D, *_VIDEO_ARCHS]}, got {kind!r}")
    expected = ResNet2D if dims == "2d" else ResNet3D
    if not isinstance(module, expected) or module.arch != kind:
        got = f"{type(module).__name__}(arch={getattr(module, 'arch', None)!r})"
        raise ValueError(f"kind={kind!r} weights need a {expected.__name__}(arch={kind!r}), got {got}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file not found: {path}. Pass the path of a local {kind} state_dict "
            f"(torch.save(model.state_dict(), path) or a .safetensors file), or None to train from scratch."
        )
    state = _read_state_dict(path)

    prefixes = _PREFIXES_2D if dims == "2d" else _PREFIXES_3D
    own = module.state_dict()
    to_load: dict[str, Tensor] = {}
    loaded: list[str] = []
    skipped: list[str] = []
    for key, tensor in state.items():
        if not key.startswith(prefixes) or key not in own:
            skipped.append(key)
            continue
        target_shape = own[key].shape
        if tensor.shape != target_shape:
            adapted = _adapt_first_conv(tensor, target_shape) if key == _FIRST_CONV[dims] else None
            if adapted is None:
                log.debug("skip %s: checkpoint %s vs model %s", key, tuple(tensor.shape), tuple(target_shape))
                skipped.append(key)
                continue
            tensor = adapted
        to_load[key] = tensor
        loaded.append(key)
    # strict=False: attention parameters (and skipped tensors) keep their init.
    module.load_state_dict(to_load, strict=False)
    log.info("Loaded %d tensors from %s (%s); skipped %d", len(loaded), path, kind, len(skipped))
    return loaded, skipped
