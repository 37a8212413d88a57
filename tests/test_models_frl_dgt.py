"""Tests for FRL-DGT (displacement generation + transformer fusion) and STSTNet.

CI sizes: 24-64 px, batch 2 (one DGM pre-training run on 24 px pairs, a few seconds on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from famnet_pl.losses import LossWeights
from famnet_pl.models.components.frl_dgt import (
    FRLDGT,
    REGION_NAMES,
    TEMPLATE_LANDMARKS,
    DisplacementGenerator,
    displacement_losses,
    pretrain_displacement,
    region_boxes,
    roi_tokens,
    warp,
)
from famnet_pl.models.components.ststnet import STSTNet
from famnet_pl.models.frl_dgt import MOVED_TO_LOSS_WEIGHTS, frl_dgt
from famnet_pl.models.module import MERLitModule
from famnet_pl.models.registry import ModelOptionError, create_model
from famnet_pl.models.ststnet import ststnet

NUM_CLASSES = 4
NUM_AUS = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _textures(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random colour textures (periods of ~size/3 and ~size/6 px), std ~1 like normalised frames."""
    x = torch.zeros(n, 3, size, size)
    for cells, amp in ((3, 1.0), (6, 0.5)):
        coarse = torch.randn(n, 3, cells, cells, generator=gen) * amp
        x += F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return x


def _shifted_pairs(n: int, size: int, gen: torch.Generator,
                   shift: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(onset, apex) with apex = warp(onset, s): a constant shift s per pair, random in [-2, 2]^2 px
    unless given, so the generator has to *measure* it (a constant output cannot fit every pair)."""
    onset = _textures(n, size, gen)
    s = torch.rand(n, 2, generator=gen) * 4 - 2 if shift is None else torch.tensor(shift).expand(n, 2)
    return onset, warp(onset, s.view(n, 2, 1, 1).expand(n, 2, size, size))


# --------------------------------------------------------------------------------------------------
# warp and the displacement generator
# --------------------------------------------------------------------------------------------------


def test_warp_zero_displacement_is_identity() -> None:
    image = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(warp(image, torch.zeros(2, 2, 9, 13)), image)


def test_warp_integer_shift_equals_roll_in_interior() -> None:
    image = torch.randn(2, 3, 16, 20)
    dx, dy = 2, -1
    d = torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(2, 2, 16, 20)
    # out(y, x) = image(y + dy, x + dx)  <=>  roll by (-dy, -dx)
    expected = torch.roll(image, shifts=(-dy, -dx), dims=(-2, -1))
    m = 3
    torch.testing.assert_close(warp(image, d)[..., m:-m, m:-m], expected[..., m:-m, m:-m])


def test_dgm_pretraining_recovers_known_shift() -> None:
    """Self-supervised pre-training must learn to measure motion, not just lower its training loss."""
    size, margin, true_shift = 24, 5, (1.5, -1.0)
    gen = torch.Generator().manual_seed(0)
    onset, apex = _shifted_pairs(256, size, gen)
    test_onset, test_apex = _shifted_pairs(8, size, torch.Generator().manual_seed(100), shift=true_shift)

    def warp_error(d: torch.Tensor) -> float:
        inner = (warp(test_onset, d) - test_apex)[..., margin:-margin, margin:-margin]
        return inner.abs().mean().item()

    identity = warp_error(torch.zeros(8, 2, size, size))
    generator = DisplacementGenerator(width=8, levels=3, corr_radius=2)
    with torch.no_grad():
        untrained = warp_error(generator(test_onset, test_apex))
    # The check below can fail: an untrained generator is the identity warp.
    assert untrained > 0.9 * identity

    history = pretrain_displacement(generator, onset, apex, steps=150, lr=3e-3, batch_size=16, seed=0)
    assert len(history) == 150 and all(map(torch.isfinite, torch.tensor(history)))
    assert sum(history[-20:]) / 20 < 0.6 * sum(history[:20]) / 20

    with torch.no_grad():
        d = generator(test_onset, test_apex)
    assert warp_error(d) < 0.5 * identity
    mean_shift = d[..., margin:-margin, margin:-margin].mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean_shift, torch.tensor(true_shift), atol=0.4, rtol=0.0)


def test_dgm_any_size_and_zero_init() -> None:
    generator = DisplacementGenerator(width=4, levels=2)
    onset, apex = torch.randn(2, 3, 21, 30), torch.randn(2, 3, 21, 30)
    d = generator(onset, apex)
    assert d.shape == (2, 2, 21, 30)
    assert d.abs().max() < 0.05  # near-zero output layer: starts as the identity warp


def test_displacement_losses_terms() -> None:
    onset = torch.randn(2, 3, 16, 16)
    d = torch.randn(2, 2, 16, 16)
    flow = -3.0 * d + 0.5  # d ~ -flow up to a per-channel affine map: perfect guidance
    terms = displacement_losses(onset, warp(onset, d), d, flow=flow)
    assert list(terms) == ["dgm_photo", "dgm_smooth", "dgm_flow"]  # the order they are summed in
    assert terms["dgm_photo"] < 1e-2
    assert terms["dgm_flow"] < 1e-3
    # Unweighted: 1 - Pearson of opposite fields is 2.
    opposite = displacement_losses(onset, onset, d, flow=d)["dgm_flow"]
    torch.testing.assert_close(opposite, torch.tensor(2.0), atol=1e-3, rtol=0.0)
    scaled = displacement_losses(onset, onset, d, flow=-d / 2, flow_scale=2.0)["dgm_flow"]
    assert scaled < 2e-3
    assert "dgm_flow" not in displacement_losses(onset, onset, d, flow=None)
    # Only the terms asked for are computed (a zero-weight term costs nothing).
    assert list(displacement_losses(onset, onset, d, flow=flow, terms=("dgm_smooth",))) == ["dgm_smooth"]
    assert displacement_losses(onset, onset, d, flow=flow, terms=()) == {}
    with pytest.raises(ValueError, match="dgm_warp"):
        displacement_losses(onset, onset, d, terms=("dgm_warp",))


def test_pretraining_weights_are_the_loss_weights() -> None:
    """pretrain_displacement sums weight * term like the training loss; its default has no flow term."""
    gen = torch.Generator().manual_seed(0)
    onset, apex = _shifted_pairs(4, 16, gen)
    flow = torch.randn(4, 2, 16, 16, generator=gen)

    def first_loss(**kwargs) -> float:
        torch.manual_seed(0)
        generator = DisplacementGenerator(width=4, levels=2)
        return pretrain_displacement(generator, onset, apex, flow=flow, steps=1, batch_size=4, **kwargs)[0]

    torch.manual_seed(0)
    generator = DisplacementGenerator(width=4, levels=2)
    terms = displacement_losses(onset, apex, generator(onset, apex), flow=flow)
    weights = {"dgm_photo": 0.5, "dgm_smooth": 0.3, "dgm_flow": 0.2}
    # (the sampled batch is a permutation of the 4 pairs: the means are those of the full set)
    expected = sum(w * terms[k] for k, w in weights.items()).item()
    assert first_loss(weights=weights) == pytest.approx(expected, rel=1e-5)
    default = (1.0 * terms["dgm_photo"] + 0.1 * terms["dgm_smooth"]).item()
    assert first_loss() == pytest.approx(default, rel=1e-5)
    assert first_loss(weights={"dgm_photo": 1.0, "dgm_smooth": 0.1, "dgm_flow": 0.0}) == first_loss()
    with pytest.raises(ValueError, match="dgm_warp"):
        first_loss(weights={"dgm_warp": 1.0})


# --------------------------------------------------------------------------------------------------
# FRL-DGT
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [6, 9])
@pytest.mark.parametrize("num_aus", [0, NUM_AUS])
@pytest.mark.parametrize("size", [48, 64])
def test_frl_dgt_forward_shapes(channels: int, num_aus: int, size: int) -> None:
    model = create_model("frl_dgt", num_classes=NUM_CLASSES, num_aus=num_aus, in_channels_2d=channels,
                         au_head=num_aus > 0)
    out = model(x2d=torch.randn(2, channels, size, size))
    expected = {"emotion", "emotion_2d", "displacement", "aux_losses"} | ({"au_2d"} if num_aus else set())
    assert set(out) == expected
    assert out["emotion"].shape == (2, NUM_CLASSES) and out["emotion_2d"] is out["emotion"]
    assert out["displacement"].shape == (2, 2, size, size)
    if num_aus:
        assert out["au_2d"].shape == (2, num_aus)
    aux = out["aux_losses"]
    assert set(aux) == {"dgm_photo", "dgm_smooth"} | ({"dgm_flow"} if channels == 9 else set())
    for key, value in [*out.items(), *aux.items()]:
        if key != "aux_losses":
            assert torch.isfinite(value).all(), key
    assert all(v.ndim == 0 for v in aux.values())


@pytest.mark.parametrize("shape", [(42, 50), (112, 112)])
def test_frl_dgt_other_sizes(shape: tuple[int, int]) -> None:
    patch = 8 if shape[0] >= 112 else 4
    model = FRLDGT(num_classes=NUM_CLASSES, in_channels=6, patch_size=patch).eval()
    with torch.no_grad():
        out = model(x2d=torch.randn(1, 6, *shape))
    assert out["emotion"].shape == (1, NUM_CLASSES)
    assert out["displacement"].shape == (1, 2, *shape)


def _classification_loss(out: dict) -> torch.Tensor:
    return F.cross_entropy(out["emotion"], torch.tensor([0, 1]))


def test_frl_dgt_joint_gradients_reach_dgm_and_classifier() -> None:
    model = FRLDGT(num_classes=NUM_CLASSES, num_aus=NUM_AUS, in_channels=9, au_head=True).train()
    x = torch.randn(2, 9, 48, 48)
    # The classifier alone trains the DGM end to end (joint mode)...
    _classification_loss(model(x2d=x)).backward()
    assert model.dgm.out.weight.grad is not None and model.dgm.out.weight.grad.abs().sum() > 0
    assert model.head.emotion.weight.grad.abs().sum() > 0
    model.zero_grad()
    # ...and with the aux losses and the AU head every parameter gets a finite gradient.
    out = model(x2d=x)
    loss = _classification_loss(out) + sum(out["aux_losses"].values())
    loss = loss + F.binary_cross_entropy_with_logits(out["au_2d"], torch.ones_like(out["au_2d"]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert all(v.requires_grad for v in out["aux_losses"].values())


def test_frl_dgt_frozen_dgm_gets_no_gradient(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "dgm.pt"
    torch.save(DisplacementGenerator().state_dict(), path)
    model = FRLDGT(num_classes=NUM_CLASSES, in_channels=6, dgm_mode="frozen", dgm_weights=str(path)).train()
    out = model(x2d=torch.randn(2, 6, 48, 48))
    assert not any(v.requires_grad for v in out["aux_losses"].values())
    assert not out["displacement"].requires_grad
    (_classification_loss(out) + sum(out["aux_losses"].values())).backward()
    for name, param in model.dgm.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    assert model.head.emotion.weight.grad.abs().sum() > 0
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_frl_dgt_frozen_without_weights_warns() -> None:
    with pytest.warns(UserWarning, match="frozen"):
        FRLDGT(num_classes=NUM_CLASSES, dgm_mode="frozen")


def test_region_boxes_template_and_landmarks() -> None:
    model = FRLDGT(num_classes=NUM_CLASSES, in_channels=6).eval()
    template = torch.tensor(TEMPLATE_LANDMARKS).expand(2, -1, -1)
    default = model.region_boxes(None, 2)
    assert default.shape == (2, len(REGION_NAMES), 4)
    torch.testing.assert_close(default, region_boxes(template))
    assert ((default >= 0) & (default <= 1)).all()
    assert (default[..., 2:] > default[..., :2]).all()
    # Brows above eyes above nose above mouth; left regions left of right ones.
    y_centre = default[0, :, 1::2].mean(-1)
    assert y_centre[0] < y_centre[2] < y_centre[4] < y_centre[5]
    assert default[0, 0, 0] < default[0, 1, 0] and default[0, 2, 0] < default[0, 3, 0]

    # A face lower and wider in the crop gives other boxes, and another prediction.
    landmarks = template.clone()
    landmarks[..., 1] += 0.08
    landmarks[..., 0] = 0.5 + (landmarks[..., 0] - 0.5) * 1.3
    moved = model.region_boxes(landmarks, 2)
    assert not torch.allclose(moved, default)
    x = torch.randn(2, 6, 48, 48)
    with torch.no_grad():
        assert not torch.allclose(model(x2d=x, landmarks=landmarks)["emotion"], model(x2d=x)["emotion"])
    with pytest.raises(ValueError, match="landmarks"):
        model(x2d=x, landmarks=torch.rand(2, 4, 2))


def test_roi_tokens_sample_bin_centres() -> None:
    # A horizontal ramp: the value at map column j is j, so the bin mean is the bin centre's position.
    fmap = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 6, 8)
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 1.0]]])
    tokens = roi_tokens(fmap, boxes, 2)  # bin centres at x = 0.375, 0.625 of the map
    assert tokens.shape == (1, 1, 4, 1)
    torch.testing.assert_close(tokens.flatten(), torch.tensor([2.5, 4.5, 2.5, 4.5]))
    # The image covers half of a padded map: the same box lands on the left half.
    half = roi_tokens(fmap, boxes, 2, extent=(1.0, 0.5))
    torch.testing.assert_close(half.flatten(), torch.tensor([1.0, 2.0, 1.0, 2.0]))


@pytest.mark.parametrize("options", [{"share_local": True},
                                     {"local_depth": 0, "global_depth": 0, "face_depth": 2}])
def test_frl_dgt_fusion_ablations(options: dict) -> None:
    model = FRLDGT(num_classes=NUM_CLASSES, in_channels=6, **options)
    assert len(model.local) == (1 if options.get("share_local") else 4)
    out = model(x2d=torch.randn(2, 6, 48, 48))
    _classification_loss(out).backward()
    assert out["emotion"].shape == (2, NUM_CLASSES)


def test_dgm_weights_round_trip(tmp_path) -> None:  # noqa: ANN001
    source = DisplacementGenerator()
    for p in source.parameters():
        p.data.add_(torch.randn_like(p))
    path = tmp_path / "dgm.pt"
    torch.save(source.state_dict(), path)
    model = frl_dgt(num_classes=NUM_CLASSES, in_channels_2d=6, dgm_weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.dgm.state_dict()[key], value), key


def test_dgm_weights_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FRLDGT(num_classes=NUM_CLASSES, dgm_weights=str(tmp_path / "nope.pt"))
    path = tmp_path / "narrow.pt"
    torch.save(DisplacementGenerator(width=4).state_dict(), path)
    with pytest.raises(ValueError, match="narrow.pt"):
        FRLDGT(num_classes=NUM_CLASSES, dgm_weights=str(path))


def test_frl_dgt_invalid_inputs_and_options() -> None:
    with pytest.raises(ValueError, match="data.input_2d=pair or pair_flow"):
        frl_dgt(num_classes=NUM_CLASSES, in_channels_2d=3)
    with pytest.raises(ValueError, match="flow"):
        FRLDGT(num_classes=NUM_CLASSES, in_channels=6, token_inputs=("displacement", "flow"))
    with pytest.raises(ValueError, match="token_inputs"):
        FRLDGT(num_classes=NUM_CLASSES, token_inputs=("optical",))
    with pytest.raises(ValueError, match="dgm_mode"):
        FRLDGT(num_classes=NUM_CLASSES, dgm_mode="partly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="au_head"):
        FRLDGT(num_classes=NUM_CLASSES, num_aus=0, au_head=True)
    model = FRLDGT(num_classes=NUM_CLASSES, in_channels=9)
    with pytest.raises(ValueError, match="C=9"):
        model(x2d=torch.randn(2, 6, 48, 48))
    with pytest.raises(ValueError, match="C=9"):
        model(x3d=torch.randn(2, 3, 4, 48, 48))


def test_frl_dgt_token_inputs_from_yaml_list() -> None:
    model = frl_dgt(num_classes=NUM_CLASSES, in_channels_2d=9, token_inputs=["displacement", "apex", "flow"])
    assert model.stem[0].in_channels == 2 + 3 + 3
    assert model(x2d=torch.randn(2, 9, 48, 48))["emotion"].shape == (2, NUM_CLASSES)


SMALL = {"dgm_width": 4, "dgm_levels": 2, "embed_dim": 16, "heads": 2}


@pytest.mark.parametrize("channels", [6, 9])
def test_loss_weights_weigh_the_unweighted_dgm_terms(channels: int) -> None:
    """model.loss_weights.dgm_* weigh FRL-DGT's aux terms: the net returns them unweighted and computes
    only those with a non-zero weight; the total is the documented weighted sum, exactly."""
    weights = LossWeights(w2d=1.0, w3d=0.0, wfuse=0.0, wau=0.0, dgm_photo=0.5, dgm_smooth=0.3, dgm_flow=0.2)
    module = MERLitModule(model="frl_dgt", net=SMALL, num_classes=NUM_CLASSES, in_channels_2d=channels,
                          loss_weights=weights)
    assert module.net.active_aux_losses == ("dgm_photo", "dgm_smooth", "dgm_flow")
    assert module.aux_loss_weights() == {"dgm_photo": 0.5, "dgm_smooth": 0.3, "dgm_flow": 0.2}
    x, label = torch.randn(2, channels, 32, 32), torch.tensor([0, 1])
    out = module(x)
    aux = out["aux_losses"]
    assert set(aux) == {"dgm_photo", "dgm_smooth"} | ({"dgm_flow"} if channels == 9 else set())
    unweighted = displacement_losses(x[:, 0:3], x[:, 3:6], out["displacement"],
                                     flow=x[:, 6:8] if channels == 9 else None, **module.net.loss_options)
    for name, term in aux.items():
        torch.testing.assert_close(term, unweighted[name], rtol=0.0, atol=0.0)
    total, parts = module.criterion(out, label)
    expected = F.cross_entropy(out["emotion"], label)
    for name in aux:
        expected = expected + getattr(weights, name) * aux[name]
    assert torch.equal(total, expected)
    assert {k: parts[k] for k in aux} == aux  # logged train/loss_dgm_*: the unweighted terms


def test_zero_loss_weight_terms_are_not_computed() -> None:
    weights = LossWeights(dgm_photo=0.0, dgm_smooth=0.1, dgm_flow=0.0)
    module = MERLitModule(model="frl_dgt", net=SMALL, num_classes=NUM_CLASSES, in_channels_2d=9,
                          loss_weights=weights)
    assert module.net.active_aux_losses == ("dgm_smooth",)
    out = module(torch.randn(2, 9, 32, 32))
    assert set(out["aux_losses"]) == {"dgm_smooth"}
    _, parts = module.criterion(out, torch.tensor([0, 1]))
    assert "dgm_photo" not in parts and "dgm_flow" not in parts
    # A model on its own computes every term (its default); weights of 0 then drop them from the loss.
    standalone = FRLDGT(num_classes=NUM_CLASSES, in_channels=9, **SMALL)
    out = standalone(x2d=torch.randn(2, 9, 32, 32))
    assert set(out["aux_losses"]) == {"dgm_photo", "dgm_smooth", "dgm_flow"}
    total, parts = module.criterion(out, torch.tensor([0, 1]))
    assert set(parts) == {"ce_2d", "dgm_smooth"}
    assert torch.equal(total, 1.0 * parts["ce_2d"] + 0.1 * parts["dgm_smooth"])


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_TO_LOSS_WEIGHTS.items()))
def test_old_net_loss_weight_options_stop_naming_the_new_key(old: str, new: str) -> None:
    """An old config with a loss weight among the network options stops (one line naming the new key)
    instead of training with the default weight."""
    with pytest.raises(ModelOptionError, match=rf"^net\.{old} moved to model\.loss_weights\.{new} "
                                         rf"\(--model\.loss_weights\.{new}=0\.25\)$"):
        MERLitModule(model="frl_dgt", net={**SMALL, old: 0.25}, num_classes=NUM_CLASSES, in_channels_2d=9)


# --------------------------------------------------------------------------------------------------
# STSTNet
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 48])
def test_ststnet_forward(size: int) -> None:
    model = create_model("ststnet", num_classes=3, num_aus=NUM_AUS, in_channels_2d=3).train()
    out = model(x2d=torch.randn(2, 3, size, size))
    assert set(out) == {"emotion", "emotion_2d"}
    assert out["emotion"].shape == (2, 3) and out["emotion_2d"] is out["emotion"]
    F.cross_entropy(out["emotion"], torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ststnet_reference_layout_at_28px() -> None:
    model = STSTNet(num_classes=3, num_aus=NUM_AUS, au_head=True).eval()
    x = torch.randn(2, 3, 28, 28)
    streams = torch.cat([s(x) for s in model.streams], dim=1)
    assert streams.shape == (2, 3 + 5 + 8, 10, 10)
    # At the paper's size the adaptive pooling is an identity: FC input = 5 x 5 x 16 = 400.
    torch.testing.assert_close(model.pool(streams), F.avg_pool2d(streams, 2))
    assert model.fc.in_features == 400
    out = model(x2d=x)
    assert out["au_2d"].shape == (2, NUM_AUS)
    # 3 convs (3x3x3 -> 3, 5, 8 filters) + BN + FC(400 -> 3) + AU FC(400 -> 5).
    expected = (27 + 1) * 16 + 2 * 16 + 401 * 3 + 401 * NUM_AUS
    assert sum(p.numel() for p in model.parameters()) == expected


def test_ststnet_wrong_channels() -> None:
    with pytest.raises(ValueError, match="set data.input_2d=flow"):
        ststnet(num_classes=3, in_channels_2d=6)
    with pytest.raises(ValueError, match="C=3"):
        STSTNet(num_classes=3)(x2d=torch.randn(2, 6, 28, 28))
    with pytest.raises(ValueError, match="au_head"):
        STSTNet(num_classes=3, num_aus=0, au_head=True)


def test_displacement_module_is_pretrained_per_fold_on_training_pairs(tiny_synth, tmp_path):
    """``model.pretrain_steps``: the DGM trains self-supervised on the fold's training pairs before the
    classifier (the test subject's frames are never used); a model without a DGM refuses it."""
    from famnet_pl.config import build_cli
    from tests.conftest import REPO, tiny_args

    tiny = [a for a in tiny_args(tiny_synth, tmp_path / "cache") if not a.startswith("--model.net.")]
    args = ["--config", str(REPO / "experiments/base.yaml"),
            "--config", str(REPO / "experiments/model/frl_dgt.yaml"),
            *tiny, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
            "--model.pretrain_steps=4"]
    cli = build_cli(args)
    # The pre-training reads the loss weights of the joint training (experiments/model/frl_dgt.yaml).
    assert cli.model.aux_loss_weights() == {"dgm_photo": 1.0, "dgm_smooth": 0.1, "dgm_flow": 0.1}
    before = {k: v.clone() for k, v in cli.model.net.dgm.state_dict().items()}
    seen = []
    from famnet_pl.data.datamodule import MERDataset

    original = MERDataset._sample  # every item read, one at a time or in a batch: its manifest row

    def spy(dataset, row):
        seen.append(int(row))
        return original(dataset, row)

    MERDataset._sample = spy
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        MERDataset._sample = original
    assert len(cli.model.pretrain_history) == 4 and all(math.isfinite(v) for v in cli.model.pretrain_history)
    after = cli.model.net.dgm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    test_rows = set(cli.datamodule.test_set.indices.tolist())
    assert seen and not test_rows & set(seen)

    famnet = build_cli(["--config", str(REPO / "experiments/base.yaml"),
                        *tiny_args(tiny_synth, tmp_path / "cache"), "--trainer.fast_dev_run=1",
                        f"--trainer.default_root_dir={tmp_path}", "--model.pretrain_steps=2"])
    with pytest.raises(ValueError, match="needs a model with a displacement module"):
        famnet.trainer.fit(famnet.model, datamodule=famnet.datamodule)
