"""Atomic file writes: a crash or kill leaves either the old file or the new one, never half.

Every result file (predictions, metrics, summaries, and the fold checkpoints through
:class:`~famnet_pl.utils.checkpoint_io.AtomicCheckpointIO`) goes through these helpers: write to a
temporary sibling, flush and fsync, then ``os.replace`` (atomic on POSIX within one filesystem). A
full disk is one :class:`DiskFullError` naming the file and the space it needs; the temporary file
is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


class DiskFullError(OSError):
    """No space left on the device for a file: the message names it and the space it needs."""


def disk_full(path: str | Path, needed: int) -> DiskFullError:
    """The one-line error for ENOSPC while writing ``needed`` bytes at ``path``."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    return DiskFullError(errno.ENOSPC, f"no space left on device for {path}: it needs {needed / 1e6:.1f} MB, "
                                       f"{free / 1e6:.1f} MB are free there; free space (or move --runs-dir "
                                       "/ --data.cache_dir) and rerun: finished work is kept, nothing "
                                       "half-written is left")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.
    A full disk raises :class:`DiskFullError` and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(exc, path, len(data))
        raise


def raise_if_disk_full(exc: BaseException, path: str | Path, needed: int) -> None:
    """Turn ENOSPC while writing ``needed`` bytes at ``path`` into the one-line :class:`DiskFullError`
    (call it in the ``except`` that has removed the temporary file)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
        raise disk_full(path, needed) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (sorted keys, indented: stable bytes for identical content) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The bytes a CSV is written as (float format fixed so identical results give identical bytes)."""
    return frame.to_csv(index=False, float_format="%.6g").encode()


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically (:func:`csv_bytes`)."""
    atomic_write_bytes(path, csv_bytes(frame))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replace_dir(staging: str | Path, target: str | Path) -> None:
    """Put the complete folder ``staging`` at ``target`` (a sibling): the old ``target`` is moved
    aside first and deleted only once the new one is in place, so a crash leaves one of them whole."""
    staging, target = Path(staging), Path(target)
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
