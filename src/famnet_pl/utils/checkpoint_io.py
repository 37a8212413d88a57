"""Checkpoints written like every other artefact: a temporary file beside the target, fsync, rename.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction, whose local temporary file
lives in the system temp folder and is *copied* across filesystems on commit: a full disk there
leaves a truncated file under the final name, and every later resume then fails to read it.
:class:`AtomicCheckpointIO` serialises to memory and hands the bytes to
:func:`famnet_pl.utils.io.atomic_write_bytes`, so a checkpoint is complete or absent, and a full
disk is one line naming the file and the space it needs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from famnet_pl.utils.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` writes atomically in the target's folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())
