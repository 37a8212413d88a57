"""Tests for the backbones: today's parameter names/shapes, every architecture's forward, library weights.

Everything is offline: HF_HUB_OFFLINE=1, TORCH_HOME / HF_HOME in tmp dirs, and any socket use fails
the test. Library weights are tested with fake caches (random tensors in the libraries' cache
layouts); CI sizes (width 8, 32-64 px, 4 frames) keep the file fast on CPU.
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import time
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from famnet_pl.models.components import resnet as resnet_mod
from famnet_pl.models.components.attention import make_attention
from famnet_pl.models.components.backbones import (
    BACKBONES_2D,
    BACKBONES_3D,
    TimmBackbone2D,
    build_backbone_2d,
    build_backbone_3d,
)
from famnet_pl.models.components.resnet import PretrainedWeightsError, ResNet2D, ResNet3D, load_pretrained
from famnet_pl.models.famnet import FAMNet
from famnet_pl.models.registry import create_model

TV_VIDEO = torchvision.models.video
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """Offline env, private caches, and a record of (forbidden) socket use."""
    torch.manual_seed(0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    attempts: list[tuple] = []

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        attempts.append(args)
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    yield attempts
    assert not attempts, f"network used: {attempts}"


def _floats_randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Distinct values for every float tensor (BN stats too), so a load is visible."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


def _keys_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _attention_keys(channels: list[int], dims: int) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for i, c in enumerate(channels):
        out += [(f"attention.{i}.{k}", s) for k, s in _keys_shapes(make_attention("cbam", c, dims=dims))]
    return out


def _today(reference: dict[str, torch.Tensor], *, width: int, in_channels: int, first_conv: str,
           first_kernel: tuple[int, ...] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Names/shapes of the pre-timm backbones, derived from the torchvision width-64 state_dict.

    Before this change ResNet2D/ResNet3D were assembled by hand with torchvision's names: every
    channel count scales with ``width / 64``, the first conv reads ``in_channels``, ``fc`` is absent
    and ``attention.i`` follows the four stages.
    """
    out = []
    for key, value in reference.items():
        if key.startswith("fc."):
            continue
        shape = list(value.shape)
        if shape:
            shape[0] = shape[0] * width // 64
        if value.ndim >= 4:
            shape[1] = in_channels if key == first_conv else shape[1] * width // 64
            if key == first_conv and first_kernel is not None:
                shape[2:] = first_kernel
        out.append((key, tuple(shape)))
    dims = 2 if reference[first_conv].ndim == 4 else 3
    return out + _attention_keys([width * m for m in (1, 2, 4, 8)], dims)


# ---------------------------------------------------------------------------------------------
# Same parameter names and shapes as before
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 64])
@pytest.mark.parametrize("small_input", [False, True])
@pytest.mark.parametrize("in_channels", [3, 6])
def test_resnet2d_names_and_shapes_as_before(width: int, small_input: bool, in_channels: int) -> None:
    reference = torchvision.models.resnet18().state_dict()
    expected = _today(reference, width=width, in_channels=in_channels, first_conv="conv1.weight",
                      first_kernel=(3, 3) if small_input else None)
    net = ResNet2D(width=width, small_input=small_input, in_channels=in_channels)
    assert _keys_shapes(net) == expected
    assert net.out_features == width * 8


def test_resnet2d_frozen_entries() -> None:
    """A few literal names/shapes of the old ResNet2D(width=8, small_input, 6 channels)."""
    got = dict(_keys_shapes(ResNet2D(width=8, small_input=True, in_channels=6)))
    assert len(got) == 120 + 4 * 3  # torchvision resnet18 minus fc, + CBAM (2 MLP convs + spatial conv) x 4
    assert got["conv1.weight"] == (8, 6, 3, 3)
    assert got["layer2.0.downsample.0.weight"] == (16, 8, 1, 1)
    assert got["layer4.1.bn2.running_var"] == (64,)
    assert got["attention.3.channel.mlp.0.weight"] == (4, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in got  # a 64-channel timm stem would add one at width 8


@pytest.mark.parametrize("width", [8, 64])
@pytest.mark.parametrize("in_channels", [3, 2])
def test_resnet3d_names_and_shapes_as_before(width: int, in_channels: int) -> None:
    expected = _today(TV_VIDEO.r3d_18().state_dict(), width=width, in_channels=in_channels,
                      first_conv="stem.0.weight")
    net = ResNet3D(width=width, in_channels=in_channels, temporal_stride_stem=2)
    assert _keys_shapes(net) == expected
    assert net.out_features == width * 8


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_resnet2d_matches_torchvision_at_width_64(arch: str) -> None:
    reference = getattr(torchvision.models, arch)().state_dict()
    expected = [(k, tuple(v.shape)) for k, v in reference.items() if not k.startswith("fc.")]
    expected += _attention_keys([64, 128, 256, 512], dims=2)
    assert _keys_shapes(build_backbone_2d(arch)) == expected


@pytest.mark.parametrize("arch", ["mc3_18", "r2plus1d_18"])
def test_resnet3d_matches_torchvision_at_width_64(arch: str) -> None:
    reference = getattr(TV_VIDEO, arch)().state_dict()
    expected = [(k, tuple(v.shape)) for k, v in reference.items() if not k.startswith("fc.")]
    expected += _attention_keys([64, 128, 256, 512], dims=3)
    assert _keys_shapes(build_backbone_3d(arch)) == expected  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Every architecture builds and runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BACKBONES_3D)
@pytest.mark.parametrize("temporal_stride", [1, 2])
def test_3d_archs_forward_backward(arch: str, temporal_stride: int) -> None:
    net = build_backbone_3d(arch, width=8, temporal_stride_stem=temporal_stride,  # type: ignore[arg-type]
                            pool_grid=2)
    out = net(torch.randn(1, 3, 4, 32, 32))
    assert out.shape == (1, net.out_features) == (1, 64 * 4)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.attention.parameters())


def test_resnet34_small_width_forward() -> None:
    net = build_backbone_2d("resnet34", width=8, small_input=True)
    assert sum(1 for _ in net.layer3) == 6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("name", [n for n in BACKBONES_2D if n not in ("resnet18", "resnet34")])
def test_timm_backbone_forward_backward_through_every_attention(name: str) -> None:
    net = build_backbone_2d(name, pool_grid=2)
    assert isinstance(net, TimmBackbone2D)
    channels = net.features.feature_info.channels()
    assert net.out_features == channels[-1] * 4
    out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, net.out_features)
    assert torch.isfinite(out).all()
    out.sum().backward()
    # Each attention got a gradient: the hooks put stages 1-3's gates into the graph.
    for i, attn in enumerate(net.attention):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters()), i


def test_timm_backbone_hooks_follow_deepcopy_and_pickle() -> None:
    net = build_backbone_2d("efficientnet_b0", attention="se").eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(pickle.loads(pickle.dumps(net))(x), net(x))  # ddp_spawn pickles the model
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(x), net(x))
    before = net(x)
    with torch.no_grad():
        for p in twin.attention[0].parameters():
            p.zero_()
    assert not torch.allclose(twin(x), before)  # the copy's hook uses the copy's attention
    torch.testing.assert_close(net(x), before)


def test_famnet_with_other_backbones() -> None:
    model = create_model("famnet_r18", num_classes=3, num_aus=2, width_2d=64, width_3d=8,
                         backbone_2d="convnext_nano", backbone_3d="r2plus1d_18")
    out = model(x2d=torch.randn(2, 3, 64, 64), x3d=torch.randn(2, 3, 4, 32, 32))
    assert out["emotion"].shape == (2, 3) and out["au_2d"].shape == (2, 2)
    assert isinstance(model.branch_2d.backbone, TimmBackbone2D)
    assert model.branch_3d.backbone.arch == "r2plus1d_18"


def test_backbone_option_errors() -> None:
    with pytest.raises(ValueError, match="width=8 applies only to"):
        build_backbone_2d("efficientnet_b0", width=8)
    with pytest.raises(ValueError, match="small_input applies only to"):
        build_backbone_2d("convnext_nano", small_input=True)
    with pytest.raises(ValueError, match="unknown 2D backbone"):
        build_backbone_2d("no_such_net")
    with pytest.raises(ValueError, match="r3d_18"):
        build_backbone_3d("r3d_50")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs width 64"):
        build_backbone_2d("resnet18", width=8, pretrained="imagenet")
    with pytest.raises(ValueError, match="needs width 64"):
        FAMNet(num_classes=3, branches="3d", width_3d=8, pretrained_3d="kinetics400")
    with pytest.raises(FileNotFoundError, match="kinetics400"):
        build_backbone_3d("r3d_18", pretrained="/no/such/file.pth")


# ---------------------------------------------------------------------------------------------
# Weights: fake caches, local files, offline errors
# ---------------------------------------------------------------------------------------------


def _torch_hub_file(weights) -> Path:  # noqa: ANN001
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / filename


def _fake_torch_hub_cache(arch: str, weights) -> dict[str, torch.Tensor]:  # noqa: ANN001
    state = _floats_randomised(getattr(TV_VIDEO, arch)().state_dict())
    path = _torch_hub_file(weights)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def _fake_hf_cache(model_name: str) -> dict[str, torch.Tensor]:
    """timm's weights for ``model_name`` at $HF_HOME/hub/models--timm--<repo>/snapshots/<rev>/."""
    repo_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / FAKE_REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_REVISION)
    state = _floats_randomised(timm.create_model(model_name).state_dict())
    save_file(state, str(repo / "snapshots" / FAKE_REVISION / "model.safetensors"))
    return state


def _assert_loaded(own: dict[str, torch.Tensor], src: dict[str, torch.Tensor], prefix: str = "") -> int:
    n = 0
    for key, value in src.items():
        if key.startswith(("fc.", "classifier.", "head.fc.")):
            continue
        assert torch.equal(own[prefix + key], value), key
        n += 1
    return n


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18"])
def test_kinetics400_from_fake_torch_hub_cache(arch: str) -> None:
    weights = {"r3d_18": TV_VIDEO.R3D_18_Weights, "r2plus1d_18": TV_VIDEO.R2Plus1D_18_Weights}[arch]
    src = _fake_torch_hub_cache(arch, weights.KINETICS400_V1)
    model = FAMNet(num_classes=3, branches="3d", width_3d=64, backbone_3d=arch,  # type: ignore[arg-type]
                   pretrained_3d="kinetics400")
    own = model.branch_3d.backbone.state_dict()
    backbone_keys = [k for k in own if not k.startswith("attention.")]
    assert _assert_loaded(own, src) == len(backbone_keys)


def test_kinetics400_adapts_stem_to_in_channels_and_stride() -> None:
    src = _fake_torch_hub_cache("r3d_18", TV_VIDEO.R3D_18_Weights.KINETICS400_V1)
    net = build_backbone_3d("r3d_18", in_channels=2, temporal_stride_stem=2, pretrained="kinetics400")
    rgb = src["stem.0.weight"]
    expected = rgb.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1, 1) * 1.5  # 3 / in_channels
    torch.testing.assert_close(net.stem[0].weight.detach(), expected)
    assert net.stem[0].stride == (2, 2, 2)
    assert torch.equal(net.state_dict()["layer4.1.conv2.0.weight"], src["layer4.1.conv2.0.weight"])


def test_imagenet_from_fake_hf_cache() -> None:
    src = _fake_hf_cache("resnet18")
    model = FAMNet(num_classes=3, branches="2d", width_2d=64, pretrained_2d="imagenet")
    own = model.branch_2d.backbone.state_dict()
    backbone_keys = [k for k in own if not k.startswith("attention.")]
    assert _assert_loaded(own, src) == len(backbone_keys)
    # Six channels: timm adapts conv1 itself; the small-input stem keeps its own conv1.
    six = build_backbone_2d("resnet18", in_channels=6, pretrained="imagenet")
    assert six.conv1.weight.shape == (64, 6, 7, 7)
    small = build_backbone_2d("resnet18", small_input=True, pretrained="imagenet")
    assert small.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(small.layer1[0].conv1.weight, src["layer1.0.conv1.weight"])


def test_imagenet_from_fake_hf_cache_generic_timm() -> None:
    src = _fake_hf_cache("efficientnet_b0")
    net = build_backbone_2d("efficientnet_b0", pretrained="imagenet")
    own = net.state_dict()
    keys = ("conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight", "blocks.6.0.conv_pwl.weight")
    for key in keys:
        assert torch.equal(own[f"features.{key}"], src[key]), key


def test_local_safetensors_file(tmp_path: Path) -> None:
    """A model.safetensors fetched from the hub by hand works as a local file for both 2D kinds."""
    r18 = _floats_randomised(timm.create_model("resnet18").state_dict())
    save_file(r18, str(tmp_path / "r18.safetensors"))
    net = build_backbone_2d("resnet18", pretrained=str(tmp_path / "r18.safetensors"))
    assert _assert_loaded(net.state_dict(), r18) == 120
    eff = _floats_randomised(timm.create_model("efficientnet_b0").state_dict())
    save_file(eff, str(tmp_path / "eff.safetensors"))
    generic = build_backbone_2d("efficientnet_b0", pretrained=str(tmp_path / "eff.safetensors"))
    assert torch.equal(generic.state_dict()["features.conv_stem.weight"], eff["conv_stem.weight"])


def test_load_pretrained_checks_arch(tmp_path: Path) -> None:
    path = tmp_path / "r3d.pt"
    torch.save(TV_VIDEO.r3d_18().state_dict(), path)
    with pytest.raises(ValueError, match="mc3_18"):
        load_pretrained(ResNet3D(arch="mc3_18", width=8), path, kind="r3d_18")


def _raises_one_line(call, *fragments: str) -> str:  # noqa: ANN001
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as info:
        call()
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, fragment
    return message


def test_offline_without_cache_says_what_to_download() -> None:
    hub = Path(os.environ["HF_HOME"]) / "hub"
    message = _raises_one_line(
        lambda: FAMNet(num_classes=3, branches="2d", width_2d=64, pretrained_2d="imagenet"),
        "pretrained_2d=imagenet", "timm/resnet18.a1_in1k", str(hub / "models--timm--resnet18.a1_in1k"),
        "HF_HUB_OFFLINE=1", "python -c \"import timm; timm.create_model('resnet18', pretrained=True)\"",
        "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors",
    )
    assert message.startswith("pretrained_2d=imagenet: timm resnet18 weights (Hugging Face repo "
                              "timm/resnet18.a1_in1k)")
    weights = TV_VIDEO.R3D_18_Weights.KINETICS400_V1
    path = _torch_hub_file(weights)
    message = _raises_one_line(
        lambda: FAMNet(num_classes=3, branches="3d", width_3d=64, pretrained_3d="kinetics400"),
        f"not in the torch hub cache ({path})", f"download {weights.url} to {path}",
        "--model.net.pretrained_3d=/path/r3d_18.pth", "HF_HUB_OFFLINE=1",
    )
    assert message.startswith("pretrained_3d=kinetics400: r3d_18 Kinetics-400 weights")


def test_online_download_failures_become_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE: an unreachable host fails before any download, a failing download is caught."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    downloads: list[str] = []

    def hf_fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        downloads.append("hf")
        raise LocalEntryNotFoundError("cannot reach the hub")

    def torch_fails(url, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        downloads.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hf_fails)
    monkeypatch.setattr(torch.hub, "download_url_to_file", torch_fails)

    monkeypatch.setattr(resnet_mod, "_unreachable", lambda url: "huggingface.co:443 unreachable: no DNS")
    _raises_one_line(lambda: build_backbone_2d("resnet18", pretrained="imagenet"),
                     "huggingface.co:443 unreachable")
    assert downloads == []

    monkeypatch.setattr(resnet_mod, "_unreachable", lambda url: None)
    _raises_one_line(lambda: build_backbone_2d("resnet18", pretrained="imagenet"),
                     "download failed: LocalEntryNotFoundError: cannot reach the hub")
    _raises_one_line(lambda: build_backbone_3d("mc3_18", pretrained="kinetics400"),
                     "download failed: URLError", "mc3_18 Kinetics-400 weights")
    assert downloads[0] == "hf" and downloads[-1] == TV_VIDEO.MC3_18_Weights.KINETICS400_V1.url
