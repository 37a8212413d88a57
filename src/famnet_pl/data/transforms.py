"""Clip-consistent augmentation: parameters drawn per sample on the CPU, applied to a whole batch
in torch on whatever device the batch is on (the GPU after transfer; the CPU in a CPU run).

Data flow::

    DataLoader worker: ClipAugment.draw(H, W) -> {flip, dx, dy[, alpha, beta]} per sample and view
        (albumentations' own seeded streams: the same draws as applying its transforms directly)
    device:            apply_clip(frames (B, N, H, W, C) float32, params) -> same shape
        (one geometric transform shared by the N frames of a sample, then photometric on the RGB
        channels only)

Only a horizontal flip and an integer translation (albumentations' ``Affine(translate_percent)``
rounds to whole pixels) are used geometrically, because they keep optical-flow vectors valid: a
flip negates the horizontal component ``u`` (done here), a translation leaves vectors unchanged.
Rotation and scaling would have to rotate/scale the vectors too, and a few degrees buy little on
aligned faces. Photometric changes never touch flow channels. Because the translation is whole
pixels with a zero border, and brightness/contrast is ``clip(x * alpha + beta, 0, 1)`` computed in
float64 as albucore does, :func:`apply_clip` gives exactly the arrays albumentations gives on the
CPU (tests/test_data_transforms.py compares them). The streams are seeded, so runs are
reproducible; each DataLoader worker reseeds its copy (:meth:`ClipAugment.reseed`).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import time

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

#: Landmark order after a horizontal flip: the image-left eye becomes the image-right one, and so on
#: (face.Landmarks order: eye L, eye R, nose, mouth L, mouth R).
FLIP_ORDER = (1, 0, 2, 4, 3)
#: One view's drawn parameters, in the order of a batch's ``aug2d`` / ``aug3d`` columns.
PARAMS = ("flip", "dx", "dy", "photo", "alpha", "beta")


def params_tensor(params: dict[str, float]) -> Tensor:
    """A sample's drawn parameters as one float64 ``(6,)`` tensor in :data:`PARAMS` order (one
    tensor, not six, per view: a DataLoader worker sends every tensor of a batch separately)."""
    return torch.tensor([params[k] for k in PARAMS], dtype=torch.float64)


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
        self.flip_p, self.translate = flip_p, translate
        self.geometric = A.Compose(
            [A.HorizontalFlip(p=flip_p),
             A.Affine(translate_percent=(-translate, translate), scale=1.0, rotate=0.0, p=1.0)],
            seed=seed, save_applied_params=True,
        )
        self.photometric = A.Compose(
            [A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=0.8)],
            seed=seed + 1, save_applied_params=True,
        )
        self._pixel = np.zeros((1, 1, 1, 3), np.float32)  # brightness scales with its dtype's range

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

    def draw(self, height: int, width: int, *, photometric: bool) -> dict[str, float]:
        """One sample's parameters for a view of side ``height`` x ``width``: ``flip`` (0/1), the
        shift ``dx``, ``dy`` in whole pixels, and with ``photometric`` (the view holds RGB) whether
        brightness/contrast applies (``photo``) with its ``alpha`` (contrast) and ``beta``
        (brightness); identity values where a transform did not fire.

        The draws are albumentations' own: the calls its ``Compose`` makes, in its order, on each
        transform's seeded stream (the Compose's draw, then per transform ``should_apply`` and its
        shape-dependent parameters), without warping a stand-in image. So the streams advance
        exactly as applying the transforms to the frames would advance them
        (tests/test_data_transforms.py checks the arrays against albumentations itself)."""
        self.geometric.py_random.random()  # Compose's "need to run" draw (p=1: it always runs)
        flip, affine = self.geometric.transforms
        flipped = flip.should_apply()
        shift = affine.get_params_dependent_on_data({"shape": (height, width)}, {})["matrix"][:2, 2]
        params = {"flip": float(flipped), "dx": float(shift[0]), "dy": float(shift[1]),
                  "photo": 0.0, "alpha": 1.0, "beta": 0.0}
        if photometric:
            self.photometric.py_random.random()
            (change,) = self.photometric.transforms
            if change.should_apply():
                drawn = change.get_params_dependent_on_data({}, {"images": self._pixel})
                alpha = float(np.float32(drawn["alpha"]))  # albucore multiplies by a float32 array
                params |= {"photo": 1.0, "alpha": alpha, "beta": float(drawn["beta"])}
        return params

    def draw_many(self, rng: np.random.Generator, n: int, height: int, width: int) -> dict[str, Tensor]:
        """Geometric parameters of ``n`` samples at once from ``rng`` (numpy, not albumentations'
        streams; the same distributions as :meth:`draw`: a flip with ``flip_p``, a shift of
        ``int(u * side)`` pixels, u uniform in +-``translate``), no photometric change: for the flow
        views of stacked folds (loso/stacked.py), where a draw per sample would cost more than the
        training step."""
        flip = rng.random(n) < self.flip_p
        dx = np.trunc(rng.uniform(-self.translate, self.translate, n) * width)
        dy = np.trunc(rng.uniform(-self.translate, self.translate, n) * height)
        zeros, ones = np.zeros(n), np.ones(n)
        drawn = {"flip": flip, "dx": dx, "dy": dy, "photo": zeros, "alpha": ones, "beta": zeros}
        return {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in drawn.items()}

    def __call__(self, frames: np.ndarray, *, rgb: slice | None, flow_u: int | None,
                 points: np.ndarray | None = None):
        """Augment one sample on the CPU (draw, then :func:`apply_clip`).

        Args:
            frames: float32 ``(N, H, W, C)``; RGB values in [0, 1].
            rgb: channel slice holding RGB (photometric changes apply there), or None.
            flow_u: channel index of the horizontal flow component, or None.
            points: optional ``(K, 2)`` xy normalised to [0, 1] by the side (pixel centres), moved
                with the frames (:func:`move_points`).

        Returns:
            The augmented float32 array, same shape; ``(array, points)`` when ``points`` is given.
        """
        params = self.draw(frames.shape[1], frames.shape[2], photometric=rgb is not None)
        batch = {k: torch.tensor([v], dtype=torch.float64) for k, v in params.items()}
        out = apply_clip(torch.from_numpy(np.array(frames, np.float32))[None], batch, rgb=rgb,
                         flow_u=flow_u)[0].numpy()
        return out if points is None else (out, move_points(points, params, frames.shape[2], frames.shape[1]))


def move_points(points: np.ndarray, params: dict[str, float], width: int, height: int) -> np.ndarray:
    """``(K, 2)`` xy in [0, 1] moved as :func:`apply_clip` moves the frames: flipped (left and right
    swapped, :data:`FLIP_ORDER`) and shifted by ``(dx / width, dy / height)``."""
    points = np.array(points, dtype=np.float32)
    if params["flip"]:
        points = hflip_points(points)
    return points + np.array([params["dx"] / width, params["dy"] / height], dtype=np.float32)


def apply_clip(frames: Tensor, params: dict[str, Tensor], *, rgb: slice | None,
               flow_u: int | None) -> Tensor:
    """Apply drawn parameters to a batch of samples, on the batch's device.

    Args:
        frames: float32 ``(B, N, H, W, C)``: the N frames of each sample share its parameters.
        params: ``{flip, dx, dy, photo, alpha, beta}``, each ``(B,)`` (:meth:`ClipAugment.draw`).
        rgb: channel slice that brightness/contrast changes, or None.
        flow_u: the horizontal-flow channel a flip negates, or None.

    Returns:
        A new ``(B, N, H, W, C)`` float32 tensor.
    """
    b, _, h, w, _ = frames.shape
    device = frames.device
    flip = params["flip"].to(device) > 0
    dx, dy = (params[k].to(device).long() for k in ("dx", "dy"))
    pad = int(max(dx.abs().max(), dy.abs().max(), 0)) if b else 0
    padded = torch.nn.functional.pad(frames, (0, 0, pad, pad, pad, pad))  # (B, N, H + 2p, W + 2p, C)
    rows, cols = moved_index(flip, dx, dy, h, w, pad)
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, N, C)
    out = out.permute(0, 3, 1, 2, 4).contiguous()
    if flow_u is not None:
        out[..., flow_u] *= torch.where(flip, -1.0, 1.0).to(out.dtype).view(-1, 1, 1, 1)
    if rgb is not None:
        photo = params["photo"].to(device) > 0
        if photo.any():
            # albucore's float path: x * float32(alpha) + beta in float64, clipped to [0, 1]
            alpha = params["alpha"].to(device, torch.float64).view(-1, 1, 1, 1, 1)
            beta = params["beta"].to(device, torch.float64).view(-1, 1, 1, 1, 1)
            part = out[..., rgb]
            changed = (part.double() * alpha + beta).clamp_(0.0, 1.0).float()
            out[..., rgb] = torch.where(photo.view(-1, 1, 1, 1, 1), changed, part)
    return out


def moved_index(flip: Tensor, dx: Tensor, dy: Tensor, height: int, width: int,
                pad: int) -> tuple[Tensor, Tensor]:
    """Where each output pixel of a flip and shift reads from: ``(rows (B, H), cols (B, W))`` into
    frames zero-padded by ``pad`` on each side (``pad`` >= every ``|dx|``, ``|dy|``), for one gather
    ``padded[b, rows[b, y], cols[b, x]]``. ``flip`` (B,) bool, ``dx``/``dy`` (B,) integer shifts.

    out[y, x] = src[y - dy, x'] with x' = x - dx, mirrored (W - 1 - x') when flipped; positions
    outside the frame read the padding (albumentations' fill 0). A pure copy: the values are
    exactly the ones moved. The one definition of the geometry for :func:`apply_clip` and the
    stacked folds (loso/stacked.py)."""
    device = dx.device
    cols = torch.arange(width, device=device)[None] - dx[:, None]  # (B, W) in source coordinates
    cols = torch.where(flip[:, None], width - 1 - cols, cols)
    rows = torch.arange(height, device=device)[None] - dy[:, None]  # (B, H)
    # (an outside position means a shift, so pad > 0 and index 0 is padding)
    cols = torch.where((cols >= 0) & (cols < width), cols + pad, 0)
    rows = torch.where((rows >= 0) & (rows < height), rows + pad, 0)
    return rows, cols


def hflip_points(points: np.ndarray) -> np.ndarray:
    """``(K, 2)`` xy in [0, 1] (pixel centres) after ``image[:, ::-1]``: pixel i -> W - 1 - i, i.e.
    x -> 1 - x, and left/right landmarks swapped (:data:`FLIP_ORDER`) when there are five."""
    points = np.array(points, dtype=np.float32)
    points[:, 0] = 1.0 - points[:, 0]
    return points[list(FLIP_ORDER)] if len(points) == len(FLIP_ORDER) else points


def hflip(frames: Tensor, flow_u: int | None) -> Tensor:
    """``(..., H, W, C)`` frames mirrored left-right, as :func:`apply_clip`'s flip does: the
    horizontal flow channel ``flow_u`` (None: no flow) negated. For flip test-time augmentation."""
    out = frames.flip(-2)
    if flow_u is not None:
        out[..., flow_u] *= -1.0
    return out
