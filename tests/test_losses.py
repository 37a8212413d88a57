"""Weighted multi-task loss: weights, skipped terms, AU masking, model aux terms."""

import pytest
import torch
import torch.nn.functional as F

from famnet_pl.losses import LossWeights, WeightedMultiTaskLoss, masked_bce


def _outputs(branches=("2d", "3d", "fused"), a=3):
    torch.manual_seed(0)
    out = {f"emotion_{b}": torch.randn(5, 4, requires_grad=True) for b in branches}
    out.update({f"au_{b}": torch.randn(5, a, requires_grad=True) for b in branches if b != "fused"})
    return out


def test_total_is_the_documented_weighted_sum():
    out, label = _outputs(), torch.tensor([0, 1, 2, 3, 0])
    au, mask = torch.randint(0, 2, (5, 3)).float(), torch.ones(5, 3)
    w = LossWeights(w2d=0.3, w3d=0.7, wfuse=1.3, wau=0.2)
    total, parts = WeightedMultiTaskLoss(w)(out, label, au, mask)
    expected = (0.3 * F.cross_entropy(out["emotion_2d"], label)
                + 0.7 * F.cross_entropy(out["emotion_3d"], label)
                + 1.3 * F.cross_entropy(out["emotion_fused"], label)
                + 0.2 * (F.binary_cross_entropy_with_logits(out["au_2d"], au)
                         + F.binary_cross_entropy_with_logits(out["au_3d"], au)))
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"ce_2d", "ce_3d", "ce_fused", "bce_au"}
    total.backward()


def test_single_branch_skips_missing_terms():
    total, parts = WeightedMultiTaskLoss()(_outputs(("2d",)), torch.zeros(5, dtype=torch.long),
                                           torch.zeros(5, 3), torch.ones(5, 3))
    assert set(parts) == {"ce_2d", "bce_au"}


def test_masked_entries_do_not_contribute():
    logits, targets = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    garbage = targets.clone()
    garbage[mask == 0] = 1 - garbage[mask == 0]
    torch.testing.assert_close(masked_bce(logits, targets, mask), masked_bce(logits, garbage, mask))
    torch.testing.assert_close(masked_bce(logits, targets, mask),
                               F.binary_cross_entropy_with_logits(logits[[0, 2]], targets[[0, 2]]))


def test_aux_terms_are_weighted_by_their_loss_weights_field():
    """A model's aux terms come unweighted; LossWeights.<name> weighs them (0: dropped), parts stay
    unweighted, and a term with no LossWeights field is an error, not a silent drop."""
    out, label = _outputs(("2d",)), torch.tensor([0, 1, 2, 3, 0])
    photo, smooth, flow = torch.tensor(0.8, requires_grad=True), torch.tensor(0.4), torch.tensor(1.5)
    out["aux_losses"] = {"dgm_photo": photo, "dgm_smooth": smooth, "dgm_flow": flow}
    w = LossWeights(w2d=0.3, wau=0.0, dgm_photo=0.7, dgm_smooth=0.2, dgm_flow=0.0)
    total, parts = WeightedMultiTaskLoss(w)(out, label)
    ce = F.cross_entropy(out["emotion_2d"], label)
    assert torch.equal(total, 0.3 * ce + 0.7 * photo + 0.2 * smooth)  # same operations, same order
    assert set(parts) == {"ce_2d", "dgm_photo", "dgm_smooth"}
    assert parts["dgm_photo"] is photo and parts["dgm_smooth"] is smooth
    total.backward()
    assert photo.grad == 0.7
    out["aux_losses"] = {"dgm_warp": photo}
    with pytest.raises(KeyError, match="dgm_warp"):
        WeightedMultiTaskLoss(w)(out, label)


def test_aux_weight_names_only_aux_fields():
    w = LossWeights()
    assert [w.aux_weight(name) for name in ("dgm_photo", "dgm_smooth", "dgm_flow")] == [1.0, 0.1, 0.1]
    with pytest.raises(KeyError, match="w2d"):
        w.aux_weight("w2d")  # an emotion weight is not an aux weight


def test_label_smoothing_reaches_every_emotion_term():
    logits, label = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    outputs = {"emotion_2d": logits, "emotion_3d": logits * 2, "emotion_fused": logits - 1}
    _, parts = WeightedMultiTaskLoss(label_smoothing=0.2)(outputs, label)
    for name, key in (("ce_2d", "emotion_2d"), ("ce_3d", "emotion_3d"), ("ce_fused", "emotion_fused")):
        expected = torch.nn.functional.cross_entropy(outputs[key], label, label_smoothing=0.2)
        assert torch.isclose(parts[name], expected)
        assert not torch.isclose(parts[name], torch.nn.functional.cross_entropy(outputs[key], label))
