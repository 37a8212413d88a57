"""See the preprocessing: one PNG per sample with what the model is fed.

Panels: the onset and apex frames after face crop and registration, the onset->apex flow coloured
in HSV (hue = direction, brightness = magnitude, scaled to the sample's 99th percentile), the optical
strain, and the sampled clip as a strip. ``famnet-pl show SAMPLE_ID DATASET`` writes it; the arrays
come from the same code as the cache (cache.preprocess_sample), so what you see is what trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from famnet_pl.data.preprocess import ViewConfig, preprocess_sample
from famnet_pl.utils.plot import figure_png, pyplot


def flow_to_rgb(flow: np.ndarray) -> np.ndarray:
    """Flow ``(H, W, 2)`` -> RGB uint8: hue = direction, value = magnitude / its 99th percentile."""
    magnitude, angle = cv2.cartToPolar(np.ascontiguousarray(flow[..., 0]), np.ascontiguousarray(flow[..., 1]))
    scale = max(float(np.percentile(magnitude, 99)), 1e-6)
    hsv = np.zeros((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = (angle * 90 / np.pi).astype(np.uint8)           # OpenCV hue is 0..180
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / scale * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def render(row: dict, root: str | Path, views: ViewConfig) -> bytes:
    """PNG bytes of the preprocessing panel of one manifest row (frame layouts)."""
    arrays = preprocess_sample(row, Path(root), dataclasses.replace(views, need_flow=True), keep_frames=True)
    onset, apex, flow = arrays["onset_frame"], arrays["apex_frame"], arrays["flow"]
    panels = [(onset, f"onset {row['onset']}"), (apex, f"apex {row['apex']} ({row['apex_source']})"),
              (flow_to_rgb(flow[..., :2]), f"flow ({views.flow_algorithm}, {views.flow_pair})"),
              (flow[..., 2], "optical strain")]
    clip = arrays.get("clip")
    rows = 2 if clip is not None else 1
    fig = pyplot().figure(figsize=(12, 3.2 * rows))
    for i, (image, title) in enumerate(panels):
        ax = fig.add_subplot(rows, 4, i + 1)
        ax.imshow(image, cmap="magma" if image.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if clip is not None:
        ax = fig.add_subplot(rows, 1, 2)
        ax.imshow(np.concatenate(list(clip), axis=1))
        ax.set_title(f"clip: {len(clip)} frames sampled from {row['onset']}..{row['offset']}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{row['sample_id']} ({row['emotion']}; AUs {row['au_raw'] or '-'}; flags "
                 f"{row['flags'] or '-'})", fontsize=10)
    return figure_png(fig, dpi=100)
