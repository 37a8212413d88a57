"""FAMNet's branch fusion: the four modes, and the late-fusion weight chosen on inner validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from famnet_pl.models.components.fusion import BranchFusion, late_fusion
from famnet_pl.models.module import MERLitModule
from famnet_pl.models.registry import create_model

CI = {"num_classes": 3, "num_aus": 2, "width_2d": 8, "width_3d": 8, "small_input_2d": True}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("fusion", ["late", "learned", "gated", "feature"])
def test_every_fusion_mode_trains_both_branches_and_itself(fusion):
    model = create_model("famnet_r18", fusion=fusion, **CI)
    out = model(x2d=torch.randn(4, 3, 32, 32), x3d=torch.randn(4, 3, 4, 32, 32))
    assert out["emotion"].shape == (4, 3) and torch.equal(out["emotion"], out["emotion_fused"])
    F.cross_entropy(out["emotion"], torch.tensor([0, 1, 2, 0])).backward()
    for name in ("branch_2d.head.emotion", "branch_3d.head.emotion", "fusion"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        if name == "fusion" and fusion == "late":
            assert grads == [] and "fusion.late_weight" in model.state_dict()  # a buffer: saved, not trained
            continue
        if name != "fusion" and fusion == "feature":
            continue  # feature fusion classifies the features: the heads get no gradient from it
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_weighted_modes_are_distributions_and_weights_zero_and_one_are_one_branch():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    feats = torch.randn(6, 5), torch.randn(6, 7)
    for mode in ("late", "learned", "gated"):
        fused = BranchFusion(mode, features_2d=5, features_3d=7, num_classes=4, late_weight=0.3)(a, b, *feats)
        torch.testing.assert_close(fused.exp().sum(1), torch.ones(6))
        torch.testing.assert_close(fused.exp(), 0.3 * a.softmax(1) + 0.7 * b.softmax(1))  # all start at 0.3
    torch.testing.assert_close(late_fusion(a, b, 1.0), F.log_softmax(a, 1))
    torch.testing.assert_close(late_fusion(a, b, 0.0), F.log_softmax(b, 1))
    per_sample = late_fusion(a, b, torch.tensor([[0.0], [1.0], [0.5], [0.5], [0.5], [0.5]]))
    torch.testing.assert_close(per_sample[:2], torch.stack([F.log_softmax(b, 1)[0], F.log_softmax(a, 1)[1]]))
    with pytest.raises(ValueError, match="late_weight"):
        BranchFusion("learned", features_2d=5, features_3d=7, num_classes=4, late_weight=1.0)
    with pytest.raises(ValueError, match="fusion"):
        BranchFusion("sum", features_2d=5, features_3d=7, num_classes=4)  # type: ignore[arg-type]


def _validation_epoch(module: MERLitModule, emotion_2d, emotion_3d, label) -> float:
    module.on_validation_epoch_start()
    module._val_outputs.append({"label": label, "index": torch.arange(len(label)), "emotion_2d": emotion_2d,
                                "emotion_3d": emotion_3d})
    module.on_validation_epoch_end()
    return float(module.net.fusion.late_weight)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_late_weight_from_val_picks_the_better_branch_and_never_scores_below_it():
    module = MERLitModule(model="famnet_r18", num_classes=3, num_aus=0, late_weight_from="val",
                       net={"width_2d": 8, "width_3d": 8, "small_input_2d": True})
    label = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    right = F.one_hot(label, 3).float() * 4          # a branch that is right on every sample
    wrong = F.one_hot((label + 1) % 3, 3).float() * 4  # a confidently wrong one
    assert _validation_epoch(module, right, wrong, label) == 1.0
    assert _validation_epoch(module, wrong, right, label) == 0.0
    # Two half-right branches that are right on different samples: the fused prediction beats both.
    half_a = torch.where((torch.arange(8) % 2 == 0)[:, None], right, wrong * 0.5)
    half_b = torch.where((torch.arange(8) % 2 == 1)[:, None], right, wrong * 0.5)
    w = _validation_epoch(module, half_a, half_b, label)
    fused = late_fusion(half_a, half_b, w).argmax(1)
    assert (fused == label).float().mean() > max((half_a.argmax(1) == label).float().mean(),
                                                 (half_b.argmax(1) == label).float().mean())


def test_late_weight_from_val_needs_late_fusion():
    with pytest.raises(ValueError, match="fusion=late"):
        MERLitModule(model="famnet_r18", num_classes=3, late_weight_from="val",
                  net={"width_2d": 8, "width_3d": 8, "fusion": "feature"})
    single = MERLitModule(model="amnet3d_r18", num_classes=3, late_weight_from="val", net={"width_3d": 8})
    single.on_validation_epoch_start()  # a single branch: nothing to fuse, the option is a no-op
    single._val_outputs.append({"label": torch.tensor([0, 1]), "index": torch.arange(2),
                                "emotion_3d": torch.randn(2, 3)})
    single.on_validation_epoch_end()


@pytest.mark.parametrize("mode", ["learned", "gated"])
def test_saturated_learned_and_gated_weights_keep_finite_gradients(mode):
    fusion = BranchFusion(mode, features_2d=5, features_3d=7, num_classes=4)
    with torch.no_grad():
        if mode == "learned":
            fusion.weight_logit.fill_(120.0)   # sigmoid == 1.0 exactly in float32
        else:
            fusion.gate.bias.fill_(-120.0)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    feats = torch.randn(3, 5, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion(a, b, *feats)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    used = (a, b, *fusion.parameters(), *(feats if mode == "gated" else ()))
    for tensor in used:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
