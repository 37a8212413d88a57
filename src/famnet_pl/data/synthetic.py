"""Deterministic synthetic micro-expression dataset in the CASME II on-disk format.

The built-in default dataset of the framework: small, generated in seconds, and shaped so that
a LOSO run is clearly above chance but not trivial. Data flow for one sample::

    subject face  -- drawn once per subject: head/hair/ears/neck, skin tone, smooth texture
         |           blotches and moles, eyes, brows, nose, lips; landmark anchors are kept
    AU displacement field  -- each action unit = a few Gaussian bumps of displacement (0.5-3 px
         |                    at 128 px) centred on that subject's anchors (brows, lids, cheeks,
         |                    nose, lip corners, chin); L/R variants act on one side only
    time profile  -- 0 at onset, smooth rise to 1 at the apex (inside the clip), decay to 0 at offset
         |
    nuisances  -- class-independent: blinks (eyelids close over 3-5 frames), head drift (global
         |        translation trend up to ~1.5 px), brightness flicker, Gaussian sensor noise
    JPEG  -- <root>/CASME2_RAW_selected/subNN/EPxx_yy/img<k>.jpg, k = OnsetFrame..OffsetFrame

Identity varies far more than expression, so a single frame says little about the class; the
motion between onset and apex says a lot. The sheet ``CASME2-coding-synthetic.xlsx`` mimics the
real CASME II coding sheet (same column order, blank columns, int/str mixed AU cells), and
``synthetic_spec.json`` is written last so a half-written root never looks complete.

Emotion -> AU label variants (CASME II grammar; ``L``/``R`` = the subject's left/right side,
i.e. image right/left in these frontal faces). Each sample draws one variant uniformly:

============  ==========================================================
emotion       Action Units variants
============  ==========================================================
happiness     6+12, 12, R12, L12, 6+L12, 6+R12
surprise      1+2, 1+2+5, 1+2+26, R1+R2, L1+L2, 2
disgust       4+9, 9, 4+10, 4+L10, R10, 9+10
repression    14, 15+17, 17, L14, R15, 14+17
============  ==========================================================

Besides the per-sample intensity, each subject has its own AU "style" (direction and strength of
every AU), so LOSO must generalise across people. Everything is drawn from
``np.random.default_rng([seed, subject, ...])`` streams, so equal specs give byte-identical JPEGs
and equal sheet contents (with the same OpenCV build).

Calibration (default spec, LOSO over the 8 subjects, logistic regression, 4 classes): apex frame
alone at 32x32 grey -> UAR ~0.25 (chance); Farneback flow onset->apex at 16x16x2 -> UAR ~0.84
(0.83-0.88 over seeds 0-4). Default spec generates in ~2 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import openpyxl

EMOTION_AUS: dict[str, list[str]] = {
    "happiness": ["6+12", "12", "R12", "L12", "6+L12", "6+R12"],
    "surprise": ["1+2", "1+2+5", "1+2+26", "R1+R2", "L1+L2", "2"],
    "disgust": ["4+9", "9", "4+10", "4+L10", "R10", "9+10"],
    "repression": ["14", "15+17", "17", "L14", "R15", "14+17"],
}
SYNTH_CLASSES: tuple[str, ...] = ("happiness", "surprise", "disgust", "repression")
SHEET_NAME = "CASME2-coding-synthetic.xlsx"
FRAMES_DIRNAME = "CASME2_RAW_selected"
SPEC_NAME = "synthetic_spec.json"
SHEET_COLUMNS = ("Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None,
                 "Action Units", "Estimated Emotion")
# Bump when the rendering changes, so cached roots from an older generator are regenerated.
GENERATOR_VERSION = 2

# AU -> bumps (anchor, outward dx, dy, amplitude px @128, sigma px @128). "Outward" is mirrored per
# side so one table serves both halves of the face; midline anchors (lip_low, chin) ignore laterality.
# Amplitudes are calibrated with expression_scale=1 (see the module docstring).
_AU_BUMPS: dict[int, list[tuple[str, float, float, float, float]]] = {
    1: [("brow_in", -0.15, -1.0, 1.5, 4.5)],
    2: [("brow_out", 0.1, -1.0, 1.5, 4.5)],
    4: [("brow_mid", -0.6, 0.8, 1.3, 5.0), ("brow_in", -0.5, 0.6, 0.8, 4.0)],
    5: [("lid_up", 0.0, -1.0, 0.7, 3.0)],
    6: [("cheek", 0.2, -1.0, 1.3, 6.0), ("lid_low", 0.0, -1.0, 0.6, 3.0)],
    9: [("nose_side", -0.2, -1.0, 1.1, 4.0), ("nostril", 0.1, -1.0, 0.8, 3.5),
        ("brow_in", 0.0, 1.0, 0.4, 4.0)],
    10: [("lip_up", 0.0, -1.0, 1.4, 4.5), ("nostril", 0.0, -1.0, 0.5, 3.5)],
    12: [("corner", 0.6, -0.8, 1.8, 4.5), ("cheek", 0.2, -1.0, 0.4, 6.0)],
    14: [("corner", -1.0, -0.1, 1.1, 3.5)],
    15: [("corner", 0.1, 1.0, 1.4, 4.0)],
    17: [("chin", 0.0, -1.0, 1.3, 6.0), ("lip_low", 0.0, -1.0, 0.8, 4.0)],
    26: [("lip_low", 0.0, 1.0, 1.1, 5.0), ("chin", 0.0, 1.0, 1.1, 7.0)],
}


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the generated dataset (it is the cache key, too).

    Attributes:
        n_subjects: Number of subjects (distinct faces), folders ``sub01``..``subNN``.
        clips_per_class: Clips per subject per class.
        classes: Emotions to generate, keys of ``EMOTION_AUS``.
        image_size: Frames are ``image_size x image_size`` colour JPEGs.
        min_frames: Shortest clip (onset..offset inclusive); at least 3.
        max_frames: Longest clip.
        expression_scale: Multiplies all AU displacement amplitudes (calibration knob).
        noise_std: Per-pixel Gaussian sensor noise, grey levels.
        blink_prob: Probability of one blink per clip, independent of the class.
        seed: Root of every random stream.
    """

    n_subjects: int = 8
    clips_per_class: int = 4
    classes: tuple[str, ...] = SYNTH_CLASSES
    image_size: int = 128
    min_frames: int = 14
    max_frames: int = 22
    expression_scale: float = 1.0
    noise_std: float = 3.0
    blink_prob: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))  # lists from configs/CLIs stay hashable
        unknown = [c for c in self.classes if c not in EMOTION_AUS]
        if unknown or not self.classes:
            raise ValueError(f"classes must be non-empty keys of EMOTION_AUS, got unknown {unknown}")
        if not 3 <= self.min_frames <= self.max_frames:
            raise ValueError("need 3 <= min_frames <= max_frames (onset < apex < offset)")
        if self.n_subjects < 1 or self.clips_per_class < 1 or self.image_size < 32:
            raise ValueError("need n_subjects >= 1, clips_per_class >= 1, image_size >= 32")


@dataclass
class _Face:
    """A subject's neutral face plus what the AU fields and blinks need to know about it."""

    image: np.ndarray                                   # uint8 HxWx3 BGR, neutral
    anchors: dict[tuple[str, int], tuple[float, float]]  # (name, side) -> (x, y); side 0 = midline
    eyes: list[tuple[float, float, float, float]]       # per eye: cx, cy, rx, ry
    lid: np.ndarray                                     # eyelid skin image used for blinks
    style: dict[int, tuple[float, float]]               # AU -> (rotation rad, gain) of this person


def _draw_face(rng: np.random.Generator, size: int) -> _Face:
    """Draw one subject's neutral face; all geometry is designed at 128 px and scaled by ``u``."""
    k, u = 2, size / 128.0          # draw at 2x and area-downsample: anti-aliased sub-pixel geometry
    big = size * k

    def pt(x: float, y: float) -> tuple[int, int]:  # point or axes in cv2 fixed point (shift=4)
        return int(round(x * k * 16)), int(round(y * k * 16))

    def col(c: np.ndarray | tuple) -> tuple[float, ...]:
        return tuple(float(v) for v in np.clip(c, 0, 255))

    skin = np.array([(180, 200, 235), (140, 170, 215), (100, 135, 190), (70, 100, 150),
                     (45, 70, 110), (160, 190, 225)][rng.integers(6)], float) + rng.uniform(-12, 12, 3)
    hair = np.array([(20, 20, 25), (30, 45, 70), (40, 70, 110), (90, 140, 180),
                     (60, 60, 60)][rng.integers(5)], float) * rng.uniform(0.8, 1.2)
    aa, lw = dict(lineType=cv2.LINE_AA, shift=4), max(1, int(k * u))

    # Background: vertical gradient between two random colours.
    top, bottom = rng.uniform(20, 230, 3), rng.uniform(20, 230, 3)
    ramp = np.linspace(0, 1, big)[:, None, None]
    img = np.ascontiguousarray(np.broadcast_to(top * (1 - ramp) + bottom * ramp, (big, big, 3)))

    cx, cy = size / 2 + rng.normal(0, 2.5 * u), size * 0.53 + rng.normal(0, 2.5 * u)
    hx, hy = size * rng.uniform(0.30, 0.37), size * rng.uniform(0.38, 0.45)
    y_e = cy - hy * rng.uniform(0.05, 0.18)
    if rng.random() < 0.85:  # hair mass behind the head
        cv2.ellipse(img, pt(cx, cy - hy * rng.uniform(0.15, 0.3)),
                    pt(hx * rng.uniform(1.05, 1.2), hy * rng.uniform(0.85, 1.0)), 0, 0, 360, col(hair), -1,
                    **aa)
    cv2.rectangle(img, pt(cx - hx * 0.45, cy + hy * 0.6), pt(cx + hx * 0.45, size + 1), col(skin * 0.85), -1,
                  cv2.LINE_AA, 4)
    for s in (-1, 1):  # ears
        cv2.ellipse(img, pt(cx + s * hx, y_e + 5 * u), pt(4 * u, 8 * u), 0, 0, 360, col(skin * 0.92), -1,
                    **aa)
    cv2.ellipse(img, pt(cx, cy), pt(hx, hy), 0, 0, 360, col(skin), -1, **aa)
    if rng.random() < 0.5:  # fringe, kept above the brows
        cv2.ellipse(img, pt(cx, cy - hy), pt(hx * 0.97, hy * rng.uniform(0.3, 0.45)), 0, 0, 180,
                    col(hair), -1, **aa)

    anchors: dict[tuple[str, int], tuple[float, float]] = {}
    eyes: list[tuple[float, float, float, float]] = []
    dx_e, ex, ey = hx * rng.uniform(0.36, 0.48), rng.uniform(6, 9) * u, rng.uniform(2.5, 4) * u
    y_b = y_e - rng.uniform(7, 11) * u
    iris = np.array([(30, 50, 80), (140, 100, 50), (80, 110, 60), (25, 30, 40)][rng.integers(4)], float)
    gaze = rng.normal(0, 0.6 * u, 2)
    brow_t, arch = rng.uniform(1.5, 3.2) * u, rng.uniform(1, 3) * u
    brow_in, brow_out = rng.uniform(0.8, 1.2) * ex, rng.uniform(1.1, 1.5) * ex
    for s in (-1, 1):
        ecx = cx + s * dx_e
        cv2.ellipse(img, pt(ecx, y_e), pt(ex, ey), 0, 0, 360, col((230, 235, 238)), -1, **aa)
        r = min(ey * 1.1, ex * 0.5)
        cv2.circle(img, pt(ecx + gaze[0], y_e + gaze[1]), int(r * k * 16), col(iris), -1, **aa)
        cv2.circle(img, pt(ecx + gaze[0], y_e + gaze[1]), int(r * 0.45 * k * 16), col((15, 15, 15)), -1, **aa)
        cv2.ellipse(img, pt(ecx, y_e), pt(ex, ey), 0, 0, 360, col(skin * 0.4), lw, **aa)
        cv2.ellipse(img, pt(ecx, y_e - 0.6 * ey), pt(ex * 0.9, ey), 0, 200, 340, col(skin * 0.75),
                    lw, **aa)  # lid crease
        eyes.append((ecx, y_e, ex, ey))
        # Brow: quadratic arch from inner to outer end.
        xi, xo = ecx - s * brow_in, ecx + s * brow_out
        yi, yo = y_b + rng.uniform(-1, 1) * u, y_b + rng.uniform(0, 2) * u
        ts = np.linspace(0, 1, 9)
        bx, by = xi + (xo - xi) * ts, yi + (yo - yi) * ts - arch * 4 * ts * (1 - ts)
        cv2.polylines(img, [np.array([pt(x, y) for x, y in zip(bx, by)], np.int32)], False,
                      col(hair * rng.uniform(0.6, 1.0)), max(1, int(brow_t * k)), **aa)
        anchors |= {("brow_in", s): (xi, yi), ("brow_out", s): (xo, yo), ("brow_mid", s): (bx[4], by[4]),
                    ("lid_up", s): (ecx, y_e - ey), ("lid_low", s): (ecx, y_e + ey)}

    y_n = y_e + rng.uniform(17, 24) * u
    nw = rng.uniform(3, 5) * u
    cv2.ellipse(img, pt(cx, y_n - 1 * u), pt(nw * 0.9, 2.5 * u), 0, 0, 360, col(skin * 1.06), -1, **aa)
    for s in (-1, 1):
        cv2.line(img, pt(cx + s * rng.uniform(2.5, 4) * u, y_e + 4 * u), pt(cx + s * nw * 1.1, y_n - 2 * u),
                 col(skin * 0.85), lw, **aa)
        cv2.ellipse(img, pt(cx + s * nw, y_n), pt(rng.uniform(1.5, 2.5) * u, rng.uniform(0.8, 1.3) * u),
                    0, 0, 360, col(skin * 0.45), -1, **aa)
        anchors |= {("nostril", s): (cx + s * nw, y_n), ("nose_side", s): (cx + s * 4 * u, (y_e + y_n) / 2),
                    ("cheek", s): (cx + s * dx_e, (y_e + y_n) / 2 + 3 * u)}

    y_m, w_m = y_n + rng.uniform(9, 14) * u, rng.uniform(9, 14) * u
    lip = skin * np.array([0.7, 0.65, 0.9]) * rng.uniform(0.85, 1.05)
    up_h, low_h = rng.uniform(2, 3.5) * u, rng.uniform(2.5, 4.5) * u
    upper = [(cx - w_m, y_m), (cx - w_m * 0.45, y_m - up_h), (cx, y_m - up_h * 0.6),
             (cx + w_m * 0.45, y_m - up_h), (cx + w_m, y_m)]
    cv2.fillPoly(img, [np.array([pt(x, y) for x, y in upper], np.int32)], col(lip), cv2.LINE_AA, 4)
    cv2.ellipse(img, pt(cx, y_m), pt(w_m * 0.9, low_h), 0, 0, 180, col(lip * 1.05), -1, **aa)
    cv2.polylines(img, [np.array([pt(cx - w_m, y_m), pt(cx, y_m + 0.5 * u), pt(cx + w_m, y_m)], np.int32)],
                  False, col(lip * 0.5), lw, **aa)
    y_ch = min(y_m + rng.uniform(10, 15) * u, cy + hy - 3 * u)
    cv2.ellipse(img, pt(cx, y_ch - 3 * u), pt(5 * u, 2 * u), 0, 20, 160, col(skin * 0.88), lw, **aa)
    for s in (-1, 1):
        anchors |= {("lip_up", s): (cx + s * w_m * 0.4, y_m - up_h), ("corner", s): (cx + s * w_m, y_m)}
    anchors |= {("lip_low", 0): (cx, y_m + low_h), ("chin", 0): (cx, y_ch)}
    for _ in range(rng.integers(0, 6)):  # moles: identity cues that also give flow something to track
        cv2.circle(img, pt(cx + rng.uniform(-0.8, 0.8) * hx, cy + rng.uniform(-0.6, 0.8) * hy),
                   int(rng.uniform(0.5, 1.2) * u * k * 16), col(skin * 0.55), -1, **aa)

    # Multiplicative texture at three scales (blotches to fine grain), static per subject so
    # it moves with the warp rather than flickering.
    tex = np.ones((big, big), np.float32)
    for cells, amp in ((5, 0.07), (12, 0.045), (40, 0.03)):
        grid = rng.normal(0, amp * rng.uniform(0.6, 1.4), (cells, cells)).astype(np.float32)
        tex += cv2.resize(grid, (big, big), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img * tex[..., None], 0, 255).astype(np.float32)
    img = cv2.GaussianBlur(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA), (0, 0), 0.5)
    face = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # Eyelid skin for blinks: eyes inpainted from the surrounding skin, slightly shaded.
    mask = np.zeros((size, size), np.uint8)
    for ecx, ecy, rx, ry in eyes:
        cv2.ellipse(mask, (round(ecx), round(ecy)), (round(rx * 1.3) + 1, round(ry * 1.5) + 1), 0, 0, 360,
                    255, -1)
    lid = (cv2.inpaint(face, mask, 3, cv2.INPAINT_TELEA) * 0.93).astype(np.uint8)
    # Idiosyncratic expression style: each person moves each AU a little differently (direction and
    # strength), so a model must generalise across subjects, not memorise one motion template.
    style = {au: (float(rng.normal(0, 0.35)), float(rng.uniform(0.6, 1.4))) for au in sorted(_AU_BUMPS)}
    return _Face(face, anchors, eyes, lid, style)


def _parse_aus(label: str) -> list[tuple[int, int | None]]:
    """``"6+L12"`` -> ``[(6, None), (12, +1)]``; side +1 = subject's left = image right."""
    out = []
    for tok in str(label).split("+"):
        side = {"L": 1, "R": -1}.get(tok[0])
        out.append((int(tok[1:] if side else tok), side))
    return out


def _au_field(face: _Face, label: str, rng: np.random.Generator, gain: float, size: int) -> np.ndarray:
    """Displacement field (HxWx2, px) of the AU combination at full apex intensity."""
    u = size / 128.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    disp = np.zeros((size, size, 2), np.float32)
    for au, side in _parse_aus(label):
        rot, strength = face.style.get(au, (0.0, 1.0))
        for s in ((side,) if side else (-1, 1)):
            asym = rng.uniform(0.85, 1.15)  # faces are never perfectly symmetric
            for name, out_x, dy, amp, sigma in _AU_BUMPS[au]:
                px, py = face.anchors.get((name, s)) or face.anchors[(name, 0)]
                ang = np.arctan2(dy, out_x * s) + rot * s  # mirrored so both sides share the style
                vec = np.array([np.cos(ang), np.sin(ang)])
                w = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * (sigma * u) ** 2))
                disp += (w[..., None] * (vec * amp * u * gain * asym * strength)).astype(np.float32)
    return disp


def _time_profile(n: int, apex: int) -> np.ndarray:
    """Raised-cosine rise 0 -> 1 from onset to apex, then decay back to 0 at the offset."""
    t = np.arange(n, dtype=np.float64)
    rise = 0.5 - 0.5 * np.cos(np.pi * t / apex)
    fall = 0.5 + 0.5 * np.cos(np.pi * (t - apex) / (n - 1 - apex))
    return np.where(t <= apex, rise, fall)


def _blink(face: _Face, closure: float) -> np.ndarray:
    """Neutral face with both upper eyelids lowered over ``closure`` (0 open .. 1 shut) of the eye."""
    img = face.image.copy()
    h = img.shape[0]
    ys, xs = np.mgrid[0:h, 0:h]
    for ecx, ecy, rx, ry in face.eyes:
        edge = ecy - ry * 1.2 + closure * ry * 2.4
        inside = ((xs - ecx) / (rx * 1.15)) ** 2 + ((ys - ecy) / (ry * 1.3)) ** 2 <= 1
        img[inside & (ys <= edge)] = face.lid[inside & (ys <= edge)]
        img[inside & (np.abs(ys - edge) < 0.6)] //= 3  # lash line at the lid edge
    return img


def _warp(base: np.ndarray, disp: np.ndarray, w: np.float32, shift=(0.0, 0.0)) -> np.ndarray:
    """``base`` with ``w`` times the displacement field applied (plus a global shift)."""
    size = base.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    # remap pulls from map(x): x - d(x) approximates the inverse of a small forward warp.
    mx = xs - w * disp[..., 0] - np.float32(shift[0])
    my = ys - w * disp[..., 1] - np.float32(shift[1])
    return cv2.remap(base, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def displacement_pair(*, label: str = "1+2", seed: int = 0, size: int = 128,
                      gain: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noise-free onset/apex pair and its known displacement field, rendered exactly as the
    generator renders clips (same face model, AU field and warp): ``(onset, apex, field)``, RGB
    uint8 frames and a float32 ``(size, size, 2)`` field in pixels. For checking optical flow."""
    rng = np.random.default_rng(seed)
    face = _draw_face(rng, size)
    disp = _au_field(face, label, rng, SynthSpec().expression_scale * gain, size)
    onset = face.image
    apex = _warp(onset, disp, np.float32(1.0))
    return cv2.cvtColor(onset, cv2.COLOR_BGR2RGB), cv2.cvtColor(apex, cv2.COLOR_BGR2RGB), disp


def _render_clip(face: _Face, label: str, n: int, apex: int, spec: SynthSpec,
                 rng: np.random.Generator) -> list[bytes]:
    """Render one clip to a list of JPEG byte strings (onset..offset)."""
    size, u = spec.image_size, spec.image_size / 128.0
    disp = _au_field(face, label, rng, spec.expression_scale * rng.uniform(0.25, 1.2), size)
    profile = _time_profile(n, apex)
    drift = rng.uniform(0.0, 1.5) * u * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    gains = rng.uniform(0.9, 1.1) * (1 + np.clip(rng.normal(0, 0.015, n), -0.04, 0.04))
    closure = np.zeros(n)
    if rng.random() < spec.blink_prob:
        dur = min(int(rng.integers(3, 6)), n)
        start = int(rng.integers(0, n - dur + 1))
        closure[start:start + dur] = np.sin(np.pi * np.arange(1, dur + 1) / (dur + 1))
    frames = []
    for i in range(n):
        base = _blink(face, closure[i]) if closure[i] > 0 else face.image
        shift = drift * i / (n - 1) + rng.normal(0, 0.05 * u, 2)
        img = _warp(base, disp, np.float32(profile[i]), shift).astype(np.float32)
        img = img * np.float32(gains[i]) + rng.standard_normal(img.shape, dtype=np.float32) * spec.noise_std
        ok, buf = cv2.imencode(".jpg", np.clip(np.rint(img), 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError("cv2.imencode failed to write a JPEG")
        frames.append(buf.tobytes())
    return frames


def _subject_plan(spec: SynthSpec, rng: np.random.Generator) -> list[dict]:
    """Clip list of one subject: class, AU label, unique CASME-style filename, frame numbers."""
    n_clips = len(spec.classes) * spec.clips_per_class
    eps, subs = (19, 9) if n_clips <= 100 else (99, 99)
    pairs = rng.choice(eps * subs, size=n_clips, replace=False)
    plan = []
    for j, emotion in enumerate(c for c in spec.classes for _ in range(spec.clips_per_class)):
        n = int(rng.integers(spec.min_frames, spec.max_frames + 1))
        apex = int(np.clip(round((n - 1) * rng.uniform(0.3, 0.7)), 1, n - 2))
        onset = int(rng.integers(20, 121))
        name = f"EP{pairs[j] // subs + 1:02d}_{pairs[j] % subs + 1:02d}" + ("f" if rng.random() < 0.1 else "")
        variants = EMOTION_AUS[emotion]
        plan.append(dict(clip=j, emotion=emotion, aus=variants[rng.integers(len(variants))], filename=name,
                         n=n, apex=apex, onset=onset))
    return plan


def _write_dataset(out: Path, spec: SynthSpec) -> dict[str, int]:
    """Write frames and sheet under ``out``; return counts for the spec json."""
    rows, n_frames = [], 0
    for subject in range(1, spec.n_subjects + 1):
        rng = np.random.default_rng([spec.seed, subject])
        face = _draw_face(rng, spec.image_size)  # drawn first: a face does not depend on clip counts
        for clip in _subject_plan(spec, rng):
            frames = _render_clip(face, clip["aus"], clip["n"], clip["apex"], spec,
                                  np.random.default_rng([spec.seed, subject, 1 + clip["clip"]]))
            clip_dir = out / FRAMES_DIRNAME / f"sub{subject:02d}" / clip["filename"]
            clip_dir.mkdir(parents=True)
            for i, jpg in enumerate(frames):
                (clip_dir / f"img{clip['onset'] + i}.jpg").write_bytes(jpg)
            n_frames += len(frames)
            aus = int(clip["aus"]) if clip["aus"].isdigit() else clip["aus"]  # real sheet mixes int/str
            rows.append((subject, clip["filename"], None, clip["onset"], clip["onset"] + clip["apex"],
                         clip["onset"] + clip["n"] - 1, None, aus, clip["emotion"]))
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(SHEET_COLUMNS)
    for row in sorted(rows, key=lambda r: (r[0], r[1])):
        ws.append(row)
    wb.save(out / SHEET_NAME)
    return {"subjects": spec.n_subjects, "samples": len(rows), "frames": n_frames}


def _spec_record(spec: SynthSpec) -> dict:
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}))


def _is_complete(root: Path, spec: SynthSpec) -> bool:
    try:
        saved = json.loads((root / SPEC_NAME).read_text())
    except (OSError, ValueError):
        return False
    rec = _spec_record(spec)
    return (all(saved.get(k) == v for k, v in rec.items())
            and (root / SHEET_NAME).is_file() and (root / FRAMES_DIRNAME).is_dir())


#: Named sizes of the set: the same generator and seed, more subjects. ``casme2``: CASME II's 26
#: subjects, 208 clips (26 x 4 classes x 2: the generator draws whole clips per subject and class),
#: for benchmarks at a real dataset's scale.
SIZES: dict[str, dict] = {"demo": {}, "casme2": {"n_subjects": 26, "clips_per_class": 2}}


def spec_of_size(size: str) -> SynthSpec:
    """The spec of a named size (:data:`SIZES`)."""
    if size not in SIZES:
        raise ValueError(f"synthetic size {size!r}: one of {', '.join(SIZES)}")
    return replace(SynthSpec(), **SIZES[size])


def ensure(root: str | Path, size: str = "demo") -> Path:
    """Make ``root`` hold an up-to-date synthetic set: the spec of ``size`` when it holds none, else
    the spec it was generated with, regenerated if an older generator wrote it. Returns the sheet."""
    root = Path(root)
    try:
        saved = json.loads((root / SPEC_NAME).read_text())["spec"]
        spec = SynthSpec(**{**saved, "classes": tuple(saved["classes"])})
    except (OSError, ValueError, KeyError, TypeError):
        spec = spec_of_size(size)
    return generate(root, spec)


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Serialise concurrent generate() calls on one root (e.g. several DDP ranks); POSIX only."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, callers should generate from one process
        yield
        return
    with open(root / ".synthetic.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def generate(root: str | Path, spec: SynthSpec = SynthSpec(), *, overwrite: bool = False) -> Path:
    """Write the synthetic dataset under ``root`` and return the sheet path.

    A root already holding a complete dataset of the same spec (and generator version) is left
    alone. Otherwise everything is rendered into a staging folder inside ``root`` and moved into
    place; ``synthetic_spec.json`` is removed first and written last, so a kill midway never leaves
    a root that looks complete.

    Args:
        root: Dataset root; created if missing.
        spec: What to generate.
        overwrite: Regenerate even if complete, and replace a ``CASME2_RAW_selected`` folder that
            this generator did not write (without it that case raises, to protect real data).

    Returns:
        Path of ``CASME2-coding-synthetic.xlsx``.

    Raises:
        FileExistsError: ``root`` holds a frames folder that does not look synthetic.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sheet, frames_dir, spec_path = root / SHEET_NAME, root / FRAMES_DIRNAME, root / SPEC_NAME
    with _root_lock(root):
        if not overwrite and _is_complete(root, spec):
            return sheet
        if frames_dir.exists() and not (sheet.exists() or spec_path.exists() or overwrite):
            raise FileExistsError(f"{frames_dir} was not written by the synthetic generator; "
                                  "use another root or overwrite=True")
        for stale in root.glob(".synth-staging-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".synth-staging-", dir=root))
        try:
            counts = _write_dataset(staging, spec)
            spec_path.unlink(missing_ok=True)
            if frames_dir.exists():
                os.replace(frames_dir, staging / "old-frames")  # deleted with the staging folder
            os.replace(staging / FRAMES_DIRNAME, frames_dir)
            os.replace(staging / SHEET_NAME, sheet)
            record = _spec_record(spec) | {"emotion_aus": EMOTION_AUS, "counts": counts}
            (staging / SPEC_NAME).write_text(json.dumps(record, indent=2))
            os.replace(staging / SPEC_NAME, spec_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sheet


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m famnet_pl.data.synthetic ROOT [--subjects N] ...``."""
    p = argparse.ArgumentParser(description="Generate the synthetic CASME II-format ME dataset.")
    p.add_argument("root", type=Path)
    p.add_argument("--size", choices=list(SIZES), default="demo",
                   help="demo (8 subjects, 128 clips) or casme2 (26 subjects, 208 clips); --subjects and "
                        "--clips-per-class override it")
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--clips-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=SynthSpec.seed)
    p.add_argument("--scale", type=float, default=SynthSpec.expression_scale, help="expression_scale")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    base = spec_of_size(a.size)
    spec = replace(base, n_subjects=a.subjects or base.n_subjects, seed=a.seed, expression_scale=a.scale,
                   clips_per_class=a.clips_per_class or base.clips_per_class)
    spec_path = a.root / SPEC_NAME
    before = spec_path.stat().st_mtime_ns if spec_path.exists() else None
    t0 = time.perf_counter()
    sheet = generate(a.root, spec, overwrite=a.overwrite)
    seconds = time.perf_counter() - t0
    counts = json.loads(spec_path.read_text())["counts"]
    written = 0 if spec_path.stat().st_mtime_ns == before else counts["frames"]
    note = "" if written else " (already complete)"
    print(f"{sheet}: {counts['subjects']} subjects, {counts['samples']} samples, "
          f"{len(spec.classes)} classes, {written} frames written{note}, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
