"""Frames on disk -> arrays: reading, resizing, clip sampling, optical flow and strain.

* :func:`read_frame` reads one frame as RGB uint8 and names the file when it cannot: missing,
  unreadable, or a JPEG cut short (OpenCV would silently decode the top part of a truncated JPEG).
* :func:`open_frames` gives a :class:`FrameSource` for a sample: a frame folder (``frame_pattern``
  names frame ``k``) or a video file (``frame_pattern`` ``@N``: frame ``k`` is decoded at index
  ``k - N``; decord2 decodes only the frames asked for). Both go through the same pipeline.
* :func:`clip_times` picks T (fractional) frame positions from onset to offset and
  :func:`sample_clip` reads them, blending the two neighbouring frames of a fractional position
  (linear temporal interpolation when a clip is shorter than T). Frame rates: by default a clip is
  time-normalised (T positions over onset..offset whatever its length, so 200 fps CASME II and
  30 fps CAS(ME)^3 clips both span their whole expression); with ``clip_fps`` the positions are
  spaced 1/clip_fps seconds apart at the dataset's own fps, so clips share a time scale.
* :func:`magnify` amplifies the intensity change of a frame against the onset frame (linear,
  Eulerian motion magnification) for the RGB views; flow is always computed on unmagnified frames.
* :func:`onset_apex_flow` computes the onset->apex optical flow (u, v) and the optical strain, the
  classic MER motion input. Flow is computed on grey frames at ``flow_size`` and then resized to the
  model's input size with the vectors rescaled, so values are pixels *at the input size*.

Optical strain is the magnitude of the symmetric flow-gradient tensor,
``sqrt(ux^2 + vy^2 + 0.5 * (uy + vx)^2)``, computed at the input size; it is not normalised here
(the DataModule standardises every input channel with training-subject statistics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

FlowAlgorithm = Literal["tvl1", "farneback", "dis"]
ClipView = Literal["frames", "flow"]


class FrameError(OSError):
    """A frame file that is missing or unreadable."""


def read_frame(path: str | Path) -> np.ndarray:
    """Read one frame as RGB uint8 ``(H, W, 3)`` (grey frames are replicated to 3 channels)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FrameError(f"{path}: frame missing; restore the file or fix the sample's frame range") from None
    except PermissionError:
        raise FrameError(f"{path}: frame not readable (permission denied); fix the file's permissions "
                         "(chmod a+r)") from None
    except OSError as exc:
        raise FrameError(f"{path}: frame cannot be read ({exc.strerror or type(exc).__name__}); "
                         "restore the file from the dataset") from None
    # A JPEG ends with the EOI marker; libjpeg decodes a cut-short file with only a warning.
    if path.suffix.lower() in (".jpg", ".jpeg") and b"\xff\xd9" not in data.rstrip(b"\x00 \r\n")[-64:]:
        raise FrameError(f"{path}: truncated JPEG (no end-of-image marker); "
                         "restore the file from the dataset")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f"{path}: unreadable frame (not a decodable image); "
                         "restore the file from the dataset")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FrameSource:
    """Frames of one sample by frame number: a folder of image files."""

    def __init__(self, frame_dir: Path, pattern: str) -> None:
        self.frame_dir, self.pattern = frame_dir, pattern

    def read(self, k: int) -> np.ndarray:
        """Frame ``k`` as RGB uint8."""
        return read_frame(self.frame_dir / self.pattern.format(k=k))

    def read_many(self, ks: list[int]) -> list[np.ndarray]:
        """Frames ``ks`` (each read once, in the given order)."""
        cache = {k: self.read(k) for k in dict.fromkeys(ks)}
        return [cache[k] for k in ks]


class VideoSource(FrameSource):
    """Frames of one sample from a video file; frame ``k`` is decoded at index ``k - first``."""

    def __init__(self, path: Path, first: int) -> None:
        super().__init__(path, f"@{first}")
        self.path, self.first = path, first
        try:
            import decord  # decord2: frame-exact random access

            self.reader = decord.VideoReader(str(path), num_threads=1)
        except Exception as exc:  # decord raises its own error types for a missing or broken file
            raise FrameError(f"{path}: cannot open video ({type(exc).__name__}); restore the file") from None

    def read_many(self, ks: list[int]) -> list[np.ndarray]:
        index = [k - self.first for k in ks]
        bad = [k for k, i in zip(ks, index) if not 0 <= i < len(self.reader)]
        if bad:
            raise FrameError(f"{self.path}: frames {bad[:5]} are outside the video's {len(self.reader)} "
                             f"frames (first frame number {self.first}); fix the sample's frame range")
        unique = sorted(set(index))
        try:
            batch = self.reader.get_batch(unique).asnumpy()  # only the frames asked for are decoded
        except Exception as exc:  # decord's own error types for a corrupt stream
            raise FrameError(f"{self.path}: cannot decode frames {ks[:5]} ({type(exc).__name__}); "
                             "restore the video") from None
        by_index = dict(zip(unique, batch))
        return [np.ascontiguousarray(by_index[i]) for i in index]

    def read(self, k: int) -> np.ndarray:
        return self.read_many([k])[0]


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def open_frames(root: Path, frame_dir: str, pattern: str) -> FrameSource:
    """The frame source of a manifest row (``frame_dir`` relative to ``root``)."""
    path = root / frame_dir
    if pattern.startswith("@") or path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSource(path, int(pattern[1:] or 0) if pattern.startswith("@") else 0)
    return FrameSource(path, pattern)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize: area interpolation to shrink, bilinear to enlarge (28 px flow images)."""
    enlarge = size > min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)


def clip_times(onset: int, offset: int, length: int, *, fps: float = 0,
               clip_fps: float | None = None) -> np.ndarray:
    """``length`` frame positions from ``onset``.

    Time-normalised (default): spread uniformly over ``[onset, offset]``, rounded to whole frames
    when the clip has at least ``length`` frames, fractional (interpolated) when it is shorter. With
    ``clip_fps``: spaced ``fps / clip_fps`` frames apart from the onset (a common time scale across
    datasets), held at the offset once the clip has ended.
    """
    if clip_fps:
        return np.minimum(onset + np.arange(length) * (fps / clip_fps), offset)
    times = np.linspace(onset, offset, length)
    return np.round(times) if offset - onset + 1 >= length else times


def sample_clip(frames_at, times: np.ndarray) -> np.ndarray:
    """Frames at fractional positions ``times``: each is the linear blend of its two neighbouring
    frames (exact frames where the position is whole). ``frames_at(ks)`` returns the (already
    cropped, registered, resized) frames ``ks``, e.g. ``source.read_many``. Returns uint8
    ``(T, H, W, 3)``."""
    lo = np.floor(times).astype(int)
    hi = np.minimum(lo + 1, int(np.ceil(times.max())))
    weight = (times - lo).astype(np.float32)
    needed = sorted(set(lo.tolist()) | {h for h, w in zip(hi.tolist(), weight) if w > 1e-6})
    frames = dict(zip(needed, frames_at(needed)))
    out = []
    for a, b, w in zip(lo, hi, weight):
        if w <= 1e-6:
            out.append(frames[a])
        else:
            out.append(np.rint(frames[a] * (1 - w) + frames[b] * w).astype(np.uint8))
    return np.stack(out)


def register_to(reference: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Shift ``frame`` so it lines up with ``reference`` (global translation, phase correlation).

    Removes slow head drift between onset and later frames, which is larger than most
    micro-expression motion and would otherwise dominate frame differences and flow. Sub-pixel
    accurate; border pixels are replicated.
    """
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in (reference, frame)]
    window = cv2.createHanningWindow(grey[0].shape[::-1], cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(grey[0], grey[1], window)
    shift = np.float32([[1, 0, -dx], [0, 1, -dy]])
    return cv2.warpAffine(frame, shift, frame.shape[1::-1], flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def magnify(reference: np.ndarray, frame: np.ndarray, alpha: float, *, sigma: float = 1.0) -> np.ndarray:
    """Linear (Eulerian) motion magnification of ``frame`` against ``reference`` (the onset frame):
    ``frame + alpha * G_sigma(frame - reference)``, uint8. The intensity change is spatially low-passed
    (Gaussian, ``sigma`` px) before it is amplified, so sensor noise is not amplified with the motion;
    for small motions this is the first-order magnification of Wu et al. (EVM, SIGGRAPH 2012), which
    MER work uses to make micro-expressions visible in RGB frames. ``alpha=0`` returns ``frame``."""
    if not alpha:
        return frame
    change = cv2.GaussianBlur(frame.astype(np.float32) - reference.astype(np.float32), (0, 0), sigma)
    return np.clip(frame + alpha * change, 0, 255).round().astype(np.uint8)


def _flow(prev: np.ndarray, nxt: np.ndarray, algorithm: FlowAlgorithm) -> np.ndarray:
    if algorithm == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise RuntimeError("TV-L1 needs opencv-contrib-python-headless; run `make install` "
                               "(it reinstalls contrib last) or choose flow_algorithm=farneback")
        # Fewer warps/scales than OpenCV's defaults: same mean flow on MER-sized motion, ~2x faster
        # (../shared/notes/stack.md, section 7).
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(warps=3, nscales=3, scaleStep=0.5, epsilon=0.01)
        return tvl1.calc(prev, nxt, None)
    if algorithm == "farneback":
        return cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if algorithm == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(np.ascontiguousarray(prev), np.ascontiguousarray(nxt), None)
    raise ValueError(f"unknown flow algorithm {algorithm!r}; choose tvl1, farneback or dis")


def normalise_motion(flow: np.ndarray) -> np.ndarray:
    """``flow`` (..., u, v, strain) divided by its root-mean-square displacement over every pixel (and
    frame): each sample's motion at one scale, whatever its amplitude (an intense and a subtle
    expression of the same AUs look alike; the MEGC2019 flow images were min-max scaled per image for
    the same reason). Strain is linear in the flow, so it is divided alike."""
    scale = np.sqrt(np.mean(flow[..., 0] ** 2 + flow[..., 1] ** 2)) + 1e-6
    return (flow / scale).astype(np.float32)


def optical_strain(flow: np.ndarray) -> np.ndarray:
    """Optical strain magnitude of a flow field ``(H, W, 2)`` -> ``(H, W)``."""
    u, v = flow[..., 0], flow[..., 1]
    uy, ux = np.gradient(u)
    vy, vx = np.gradient(v)
    return np.sqrt(ux**2 + vy**2 + 0.5 * (uy + vx) ** 2)


def onset_apex_flow(onset: np.ndarray, apex: np.ndarray, *, algorithm: FlowAlgorithm = "tvl1",
                    flow_size: int = 128, out_size: int = 64) -> np.ndarray:
    """Onset->apex flow and strain as a float32 ``(out_size, out_size, 3)`` array (u, v, strain).

    Args:
        onset: RGB uint8 onset frame.
        apex: RGB uint8 apex frame.
        algorithm: ``tvl1`` (MER standard, needs opencv-contrib), ``farneback`` or ``dis``.
        flow_size: square size the flow is computed at.
        out_size: square size of the returned array; vectors are rescaled to this size.
    """
    grey = [cv2.cvtColor(resize(f, flow_size), cv2.COLOR_RGB2GRAY) for f in (onset, apex)]
    flow = _flow(grey[0], grey[1], algorithm)
    flow = cv2.resize(flow, (out_size, out_size), interpolation=cv2.INTER_AREA) * (out_size / flow_size)
    return np.dstack([flow, optical_strain(flow)]).astype(np.float32)


def flow_sequence(clip: np.ndarray, *, algorithm: FlowAlgorithm = "tvl1", flow_size: int = 128,
                  out_size: int = 32) -> np.ndarray:
    """Per-frame motion of a clip: the flow and strain from its first (onset) frame to every frame.

    ``clip`` is ``(T, H, W, 3)`` RGB uint8 at full resolution; returns float32 ``(T, out_size,
    out_size, 3)`` (u, v, strain), each computed as :func:`onset_apex_flow` (at ``flow_size``, vectors
    rescaled to ``out_size``); frame 0 is the onset against itself (near zero). Every step is measured
    from the onset, not from the previous frame: the displacement grows with the expression instead of
    being split into T sub-pixel increments.
    """
    return np.stack([onset_apex_flow(clip[0], frame, algorithm=algorithm, flow_size=flow_size,
                                     out_size=out_size)
                     for frame in clip])


def peak_motion_frame(source: FrameSource, onset: int, offset: int, *, size: int = 64,
                      max_frames: int = 48) -> int:
    """Frame number of largest motion from the onset (an apex estimate).

    Farneback flow from the onset frame to up to ``max_frames`` frames spread over onset..offset, at
    ``size`` px; the frame with the largest mean flow magnitude wins. Used to repair a missing or
    impossible apex (flagged ``flow_peak``); works on frame folders and video files alike.
    """
    if offset <= onset:
        return onset
    picks = np.unique(np.linspace(onset + 1, offset,
                                  min(max_frames, offset - onset)).round().astype(int)).tolist()
    first, *rest = source.read_many([onset, *picks])
    grey = [cv2.cvtColor(resize(frame, size), cv2.COLOR_RGB2GRAY) for frame in (first, *rest)]
    scores = [np.linalg.norm(cv2.calcOpticalFlowFarneback(grey[0], g, None, 0.5, 3, 9, 3, 5, 1.1, 0),
                             axis=-1).mean()
              for g in grey[1:]]
    return int(picks[int(np.argmax(scores))])
