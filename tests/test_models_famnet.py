"""Tests for the FAMNet networks: shapes, gradients, fusion, registry, weight loading.

All models run at CI sizes (width 8, 32-48 px, 8 frames) so the file stays fast on CPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch.nn import functional as F

from famnet_pl.models.components.attention import make_attention
from famnet_pl.models.components.fusion import FeatureFusion, late_fusion
from famnet_pl.models.components.heads import MultiTaskHead
from famnet_pl.models.components.resnet import ResNet2D, ResNet3D, load_pretrained
from famnet_pl.models.famnet import FAMNet
from famnet_pl.models.registry import create_model, list_models

NUM_CLASSES = 3
NUM_AUS = 5
CI_KWARGS = {"num_classes": NUM_CLASSES, "num_aus": NUM_AUS, "width_2d": 8, "width_3d": 8,
             "small_input_2d": True}
BRANCHES = {"famnet_r18": ("2d", "3d"), "amnet2d_r18": ("2d",), "amnet3d_r18": ("3d",)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(branches: tuple[str, ...], in_channels_2d: int = 3) -> dict[str, torch.Tensor]:
    """CI-sized inputs; the fused model needs one batch size for both views."""
    batch_2d = 4 if branches == ("2d",) else 2
    inputs = {}
    if "2d" in branches:
        inputs["x2d"] = torch.randn(batch_2d, in_channels_2d, 48, 48)
    if "3d" in branches:
        inputs["x3d"] = torch.randn(2, 3, 8, 32, 32)
    return inputs


def _cases() -> list[tuple[str, str, str]]:
    """(model name, fusion, attention); fusion only varies where it has an effect."""
    cases = []
    for name, branches in BRANCHES.items():
        for fusion in ("late", "feature") if len(branches) == 2 else ("late",):
            for attention in ("cbam", "se", "none"):
                cases.append((name, fusion, attention))
    return cases


def test_registry_lists_builtin_models() -> None:
    assert set(BRANCHES) <= set(list_models())


def test_registry_import_alone_registers_models() -> None:
    code = "from famnet_pl.models.registry import list_models; print(list_models())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name in BRANCHES:
        assert name in result.stdout


def test_registry_unknown_name_lists_choices() -> None:
    with pytest.raises(KeyError, match="famnet_r18"):
        create_model("no_such_model", num_classes=3)


def test_factory_rejects_conflicting_branches() -> None:
    with pytest.raises(ValueError, match="branches"):
        create_model("amnet2d_r18", branches="3d", **CI_KWARGS)


@pytest.mark.parametrize(("name", "fusion", "attention"), _cases())
def test_forward_backward(name: str, fusion: str, attention: str) -> None:
    branches = BRANCHES[name]
    model = create_model(name, fusion=fusion, attention=attention, **CI_KWARGS)
    model.train()
    inputs = _inputs(branches)
    out = model(**inputs)

    expected = {"emotion"} | {f"{k}_{b}" for b in branches for k in ("emotion", "au")}
    if len(branches) == 2:
        expected.add("emotion_fused")
    assert set(out) == expected
    for b in branches:
        batch = inputs[f"x{b}"].shape[0]
        assert out[f"emotion_{b}"].shape == (batch, NUM_CLASSES)
        assert out[f"au_{b}"].shape == (batch, NUM_AUS)
    assert out["emotion"].shape[1] == NUM_CLASSES
    for key, value in out.items():
        assert torch.isfinite(value).all(), key

    # Multi-task loss as the LightningModule would build it: every head contributes.
    batch = out["emotion"].shape[0]
    target = torch.randint(0, NUM_CLASSES, (batch,))
    loss = F.cross_entropy(out["emotion"], target)
    for b in branches:
        loss = loss + F.cross_entropy(out[f"emotion_{b}"], target)
        loss = loss + F.binary_cross_entropy_with_logits(out[f"au_{b}"],
                                                         torch.rand_like(out[f"au_{b}"]).round())
    loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, pname
            assert torch.isfinite(param.grad).all(), pname


def test_single_branch_headline_is_branch_logits() -> None:
    model = create_model("amnet3d_r18", **CI_KWARGS).eval()
    out = model(**_inputs(("3d",)))
    assert torch.equal(out["emotion"], out["emotion_3d"])


def test_late_fusion_headline_matches_function() -> None:
    model = create_model("famnet_r18", late_weight=0.3, **CI_KWARGS).eval()
    out = model(**_inputs(("2d", "3d")))
    torch.testing.assert_close(out["emotion"], late_fusion(out["emotion_2d"], out["emotion_3d"], 0.3))


def test_six_channel_2d_input() -> None:
    model = create_model("amnet2d_r18", in_channels_2d=6, **CI_KWARGS)
    out = model(**_inputs(("2d",), in_channels_2d=6))
    assert out["emotion"].shape == (4, NUM_CLASSES)


def test_no_aus_gives_empty_au_logits() -> None:
    kwargs = {**CI_KWARGS, "num_aus": 0}
    out = create_model("famnet_r18", **kwargs)(**_inputs(("2d", "3d")))
    assert out["au_2d"].shape == (2, 0)
    assert out["au_3d"].shape == (2, 0)
    head = MultiTaskHead(16, 4, 0)
    emotion, au = head(torch.randn(3, 16))
    assert emotion.shape == (3, 4) and au.shape == (3, 0)


@pytest.mark.parametrize("missing", ["x2d", "x3d"])
def test_missing_input_raises(missing: str) -> None:
    model = create_model("famnet_r18", **CI_KWARGS)
    inputs = _inputs(("2d", "3d"))
    inputs.pop(missing)
    with pytest.raises(ValueError, match=missing):
        model(**inputs)


def test_wrong_channel_count_raises() -> None:
    model = create_model("famnet_r18", **CI_KWARGS)
    inputs = _inputs(("2d", "3d"), in_channels_2d=6)
    with pytest.raises(ValueError, match="C=3"):
        model(**inputs)
    with pytest.raises(ValueError, match="C=3"):
        model(x2d=torch.randn(2, 3, 48, 48), x3d=torch.randn(2, 1, 8, 32, 32))


def test_invalid_options_raise() -> None:
    with pytest.raises(ValueError, match="fusion"):
        FAMNet(num_classes=3, fusion="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="branches"):
        FAMNet(num_classes=3, branches="2d2d")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cbam"):
        make_attention("eca", 8, dims=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["cbam", "se", "none"])
@pytest.mark.parametrize("dims", [2, 3])
def test_attention_preserves_shape_at_tiny_width(kind: str, dims: int) -> None:
    shape = (2, 8, 4, 6, 6) if dims == 3 else (2, 8, 6, 6)
    x = torch.randn(shape)
    assert make_attention(kind, 8, dims=dims)(x).shape == x.shape  # type: ignore[arg-type]


def test_late_fusion_is_log_weighted_mean_of_softmaxes() -> None:
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    for weight in (0.0, 0.25, 0.5, 1.0):
        fused = late_fusion(a, b, weight)
        torch.testing.assert_close(fused.exp().sum(dim=1), torch.ones(5))
        expected = weight * a.softmax(dim=1) + (1 - weight) * b.softmax(dim=1)
        torch.testing.assert_close(fused.exp(), expected)
        # Normalised log-probabilities: cross-entropy treats them as logits unchanged.
        torch.testing.assert_close(F.log_softmax(fused, dim=1), fused)
    with pytest.raises(ValueError):
        late_fusion(a, b, 1.5)


def test_feature_fusion_shape() -> None:
    assert FeatureFusion(16, 32, 3)(torch.randn(2, 16), torch.randn(2, 32)).shape == (2, 3)


def _save_state_dict(model: torch.nn.Module, tmp_path, name: str) -> str:  # noqa: ANN001
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return str(path)


def _assert_loaded_equal(ours: torch.nn.Module, src: dict[str, torch.Tensor], loaded: list[str]) -> None:
    own = ours.state_dict()
    for key in loaded:
        assert torch.equal(own[key], src[key]), key


def test_load_pretrained_resnet18_round_trip(tmp_path) -> None:  # noqa: ANN001
    path = _save_state_dict(torchvision.models.resnet18(weights=None), tmp_path, "r18.pt")
    src = torch.load(path, weights_only=True)
    model = ResNet2D(width=64)
    loaded, skipped = load_pretrained(model, path, kind="resnet18")
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    expected = [k for k in src if not k.startswith("fc.")]
    assert sorted(loaded) == sorted(expected)
    _assert_loaded_equal(model, src, loaded)
    # Every conv/bn tensor of the backbone came from the checkpoint (attention excepted).
    backbone_keys = [k for k in model.state_dict() if not k.startswith("attention.")]
    assert sorted(backbone_keys) == sorted(expected)


def test_load_pretrained_r3d_18_round_trip(tmp_path) -> None:  # noqa: ANN001
    path = _save_state_dict(torchvision.models.video.r3d_18(weights=None), tmp_path, "r3d.pt")
    src = torch.load(path, weights_only=True)
    model = ResNet3D(width=64)
    loaded, skipped = load_pretrained(model, path, kind="r3d_18")
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    backbone_keys = [k for k in model.state_dict() if not k.startswith("attention.")]
    assert sorted(loaded) == sorted(backbone_keys)
    _assert_loaded_equal(model, src, loaded)


def test_load_pretrained_adapts_first_conv(tmp_path) -> None:  # noqa: ANN001
    path = _save_state_dict(torchvision.models.resnet18(weights=None), tmp_path, "r18.pt")
    rgb = torch.load(path, weights_only=True)["conv1.weight"]
    model = ResNet2D(in_channels=6, width=64)
    loaded, skipped = load_pretrained(model, path, kind="resnet18")
    assert "conv1.weight" in loaded and "conv1.weight" not in skipped
    expected = rgb.mean(dim=1, keepdim=True).repeat(1, 6, 1, 1) * 0.5
    torch.testing.assert_close(model.conv1.weight.detach(), expected)


def test_load_pretrained_skips_mismatched_shapes(tmp_path) -> None:  # noqa: ANN001
    path = _save_state_dict(torchvision.models.resnet18(weights=None), tmp_path, "r18.pt")
    _, skipped = load_pretrained(ResNet2D(width=64, small_input=True), path, kind="resnet18")
    assert "conv1.weight" in skipped
    loaded, _ = load_pretrained(ResNet2D(width=8), path, kind="resnet18")
    assert not any(k.endswith("weight") and "conv" in k for k in loaded)


def test_load_pretrained_missing_file(tmp_path) -> None:  # noqa: ANN001
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(ResNet2D(width=8), missing, kind="resnet18")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FAMNet(num_classes=3, branches="2d", width_2d=8, pretrained_2d=str(missing))
