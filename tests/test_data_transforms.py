"""The batched augmentation (transforms.apply_clip, run on the batch's device) gives exactly the
arrays albumentations gives on the CPU, draw for draw from the same seeded streams; and
views.BatchViews gives the normalised views of the per-sample path."""

import numpy as np
import pytest
import torch

from famnet_pl.data.transforms import ClipAugment, apply_clip
from famnet_pl.data.views import BatchViews


def _albumentations(aug: ClipAugment, frames: np.ndarray, rgb, flow_u) -> np.ndarray:
    """The per-sample reference: albumentations' transforms applied to the frames themselves."""
    result = aug.geometric(images=np.ascontiguousarray(frames))
    out = result["images"]
    if "HorizontalFlip" in dict(result["applied_transforms"]) and flow_u is not None:
        out[..., flow_u] *= -1.0
    if rgb is not None:
        out[..., rgb] = aug.photometric(images=np.ascontiguousarray(out[..., rgb]))["images"]
    return out


@pytest.mark.parametrize("side, channels, rgb, flow_u", [((32, 32), 3, slice(0, 3), None),
                                                        ((20, 24), 6, slice(0, 3), 3),
                                                        ((28, 28), 9, slice(0, 6), 6),
                                                        ((16, 16), 3, None, 0)])
def test_batched_augmentation_is_albumentations_exactly(side, channels, rgb, flow_u):
    rng = np.random.default_rng(0)
    reference, ours = (ClipAugment(seed=7, translate=0.2, brightness=0.4, contrast=0.4) for _ in range(2))
    frames = rng.random((24, 3, *side, channels)).astype(np.float32)  # 24 samples of 3 frames
    expected = np.stack([_albumentations(reference, f.copy(), rgb, flow_u) for f in frames])
    draws = [ours.draw(*side, photometric=rgb is not None) for _ in frames]
    params = {k: torch.tensor([d[k] for d in draws], dtype=torch.float64) for k in draws[0]}
    assert {d["flip"] for d in draws} == {0.0, 1.0} and len({d["dx"] for d in draws}) > 2
    if rgb is not None:
        assert {d["photo"] for d in draws} == {0.0, 1.0}
    got = apply_clip(torch.from_numpy(frames), params, rgb=rgb, flow_u=flow_u).numpy()
    np.testing.assert_array_equal(got, expected)


def test_batch_views_normalise_and_mirror_like_the_per_sample_path():
    rng = np.random.default_rng(1)
    stats = {"mean_2d": rng.random(6).astype(np.float32), "std_2d": rng.random(6).astype(np.float32) + 0.5,
             "mean_3d": rng.random(3).astype(np.float32), "std_3d": rng.random(3).astype(np.float32) + 0.5}
    apex = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    flow = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    clip = rng.integers(0, 256, (2, 4, 6, 6, 3), dtype=np.uint8)
    batch = {"apex": torch.from_numpy(apex), "flow": torch.from_numpy(flow), "clip": torch.from_numpy(clip),
             "tta": torch.ones(2, dtype=torch.bool), "label": torch.zeros(2, dtype=torch.long)}
    out = BatchViews("both", "diff", stats)(batch)
    assert set(out) == {"x2d", "x3d", "x2d_flip", "x3d_flip", "label"}
    view = np.concatenate([apex.astype(np.float32) / 255.0, flow], axis=-1)
    x2d = ((view - stats["mean_2d"]) / stats["std_2d"]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out["x2d"].numpy(), x2d)
    x3d = (clip.astype(np.float32) / 255.0 - stats["mean_3d"]) / stats["std_3d"]
    np.testing.assert_array_equal(out["x3d"].numpy(), (x3d - x3d[:, :1]).transpose(0, 4, 1, 2, 3))
    mirrored = view[:, :, ::-1].copy()
    mirrored[..., 3] *= -1  # the flow's u: the 2D view's channel 3 here
    np.testing.assert_array_equal(out["x2d_flip"].numpy(),
                                  ((mirrored - stats["mean_2d"]) / stats["std_2d"]).transpose(0, 3, 1, 2))
    assert out["x2d"].is_contiguous() and BatchViews("both", "diff", stats)(out) is out  # idempotent
