"""Clip-consistent augmentation (albumentations): one draw of parameters per sample, applied to
every frame of the sample.

Data flow: ``(N, H, W, C)`` float32 stack (the frames of a clip, or the apex and its flow stacked
as channels) -> geometric transform shared by all N frames -> photometric transform on the RGB
channels only -> same shape back.

Only a horizontal flip and a translation are used geometrically, because they keep optical-flow
vectors valid: a flip negates the horizontal component ``u`` (done here), a translation leaves
vectors unchanged. Rotation and scaling would have to rotate/scale the vectors too, and a few
degrees buy little on aligned faces. Photometric changes never touch flow channels.
The transforms are seeded (albumentations keeps its own RNG), so runs are reproducible; each
DataLoader worker reseeds its copy (:meth:`ClipAugment.reseed`).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import time

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402

#: Landmark order after a horizontal flip: the image-left eye becomes the image-right one, and so on
#: (face.Landmarks order: eye L, eye R, nose, mouth L, mouth R).
FLIP_ORDER = (1, 0, 2, 4, 3)


class ClipAugment:
    """Same random flip/translation for all frames of a sample; brightness/contrast on RGB.

    Args:
        flip_p: probability of a horizontal flip.
        translate: maximum shift as a fraction of the side.
        brightness: maximum brightness change (fraction of the range).
        contrast: maximum contrast change.
        seed: RNG seed of the transforms.
    """

    def __init__(self, *, flip_p: float = 0.5, translate: float = 0.06, brightness: float = 0.1,
                 contrast: float = 0.1, seed: int = 0) -> None:
        self.geometric = A.Compose(
            [A.HorizontalFlip(p=flip_p),
             A.Affine(translate_percent=(-translate, translate), scale=1.0, rotate=0.0, p=1.0)],
            seed=seed, save_applied_params=True,
        )
        self.photometric = A.Compose(
            [A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=0.8)],
            seed=seed + 1,
        )

    def reseed(self, seed: int) -> None:
        """Give a DataLoader worker its own stream."""
        self.geometric.set_random_seed(seed)
        self.photometric.set_random_seed(seed + 1)

    def _rngs(self) -> list:
        # Every Compose and every transform inside it holds its own generator pair.
        return [obj for compose in (self.geometric, self.photometric)
                for obj in (compose, *compose.transforms)]

    def get_state(self) -> list:
        """RNG states of every transform (saved in resume checkpoints: a resumed fold draws the
        same augmentations as an uninterrupted one)."""
        return [(obj.random_generator.bit_generator.state, obj.py_random.getstate()) for obj in self._rngs()]

    def set_state(self, state: list) -> None:
        """Restore :meth:`get_state` in place (the transforms share nothing else)."""
        for obj, (numpy_state, python_state) in zip(self._rngs(), state, strict=True):
            obj.random_generator.bit_generator.state = numpy_state
            obj.py_random.setstate(python_state)

    def __call__(self, frames: np.ndarray, *, rgb: slice | None, flow_u: int | None,
                 points: np.ndarray | None = None):
        """Augment one sample.

        Args:
            frames: float32 ``(N, H, W, C)``; RGB values in [0, 1].
            rgb: channel slice holding RGB (photometric changes apply there), or None.
            flow_u: channel index of the horizontal flow component, or None.
            points: optional ``(K, 2)`` xy normalised to [0, 1] by the side (pixel centres), moved
                with the frames; a flip also swaps left and right (:data:`FLIP_ORDER` for the five
                face landmarks).

        Returns:
            The augmented float32 array, same shape; ``(array, points)`` when ``points`` is given.
        """
        result = self.geometric(images=np.ascontiguousarray(frames))
        out = result["images"]
        applied = dict(result["applied_transforms"])
        flipped = "HorizontalFlip" in applied
        if flipped and flow_u is not None:
            out[..., flow_u] *= -1.0
        if rgb is not None:
            out[..., rgb] = self.photometric(images=np.ascontiguousarray(out[..., rgb]))["images"]
        if points is None:
            return out
        points = np.array(points, dtype=np.float32)
        if flipped:
            points = hflip_points(points)
        shift = applied["Affine"]["matrix"][:2, 2]  # pixels (translation only: scale 1, no rotation)
        return out, points + (shift / (frames.shape[2], frames.shape[1])).astype(np.float32)


def hflip_points(points: np.ndarray) -> np.ndarray:
    """``(K, 2)`` xy in [0, 1] (pixel centres) after ``image[:, ::-1]``: pixel i -> W - 1 - i, i.e.
    x -> 1 - x, and left/right landmarks swapped (:data:`FLIP_ORDER`) when there are five."""
    points = np.array(points, dtype=np.float32)
    points[:, 0] = 1.0 - points[:, 0]
    return points[list(FLIP_ORDER)] if len(points) == len(FLIP_ORDER) else points


def hflip(frames: np.ndarray, flow_u: int | None) -> np.ndarray:
    """``(N, H, W, C)`` frames mirrored left-right, as :class:`ClipAugment`'s flip does: the
    horizontal flow channel ``flow_u`` (None: no flow) negated. For flip test-time augmentation."""
    out = np.ascontiguousarray(frames[:, :, ::-1])
    if flow_u is not None:
        out[..., flow_u] *= -1.0
    return out
