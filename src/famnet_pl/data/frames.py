"""Frames on disk -> arrays: reading, resizing, clip index sampling, optical flow and strain.

* :func:`read_frame` reads one frame as RGB uint8 and names the file when it cannot.
* :func:`clip_indices` picks T frame numbers from onset to offset (uniform; a clip shorter than T
  repeats frames, i.e. nearest-neighbour temporal interpolation).
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


class FrameError(OSError):
    """A frame file that is missing or unreadable."""


def read_frame(path: str | Path) -> np.ndarray:
    """Read one frame as RGB uint8 ``(H, W, 3)`` (grey frames are replicated to 3 channels)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f"{path}: missing or unreadable frame; check the file or the sample's frame range")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize: area interpolation to shrink, bilinear to enlarge (28 px flow images)."""
    enlarge = size > min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)


def clip_indices(onset: int, offset: int, length: int) -> np.ndarray:
    """``length`` frame numbers spread uniformly over ``[onset, offset]`` (repeats when short)."""
    return np.round(np.linspace(onset, offset, length)).astype(int)


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


def peak_motion_frame(paths: list[Path], *, first: int, size: int = 64, max_frames: int = 48) -> int:
    """Frame number of largest motion from the first frame (an apex estimate).

    Farneback flow from ``paths[0]`` (the onset) to up to ``max_frames`` frames spread over the clip,
    at ``size`` px; the frame with the largest mean flow magnitude wins. ``first`` is the frame
    number of ``paths[0]``. Used to repair a missing or impossible apex (flagged ``flow_peak``).
    """
    def grey(path: Path) -> np.ndarray:
        return cv2.cvtColor(resize(read_frame(path), size), cv2.COLOR_RGB2GRAY)

    if len(paths) < 2:
        return first
    onset = grey(paths[0])
    picks = np.unique(np.linspace(1, len(paths) - 1, min(max_frames, len(paths) - 1)).round().astype(int))
    scores = [np.linalg.norm(cv2.calcOpticalFlowFarneback(onset, grey(paths[i]), None, 0.5, 3, 9, 3, 5, 1.1, 0),
                             axis=-1).mean() for i in picks]
    return first + int(picks[int(np.argmax(scores))])
