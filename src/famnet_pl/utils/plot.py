"""Matplotlib figures as reproducible PNG bytes (headless backend, no timestamp metadata)."""

from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, *, dpi: int = 100) -> bytes:
    """Lay out, render and close ``fig``; PNG bytes without the software stamp, so equal figures
    give equal files."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
