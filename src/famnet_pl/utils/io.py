"""Atomic file writes: a crash or kill leaves either the old file or the new one, never half.

Every result file (predictions, metrics, summaries) goes through these helpers: write to a
temporary sibling, flush and fsync, then ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
