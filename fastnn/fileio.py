"""Atomic file writes: a temporary file beside the target, flushed, fsynced, renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(
    path: str | Path, write: Callable[[BinaryIO], None], mode: int | None = None
) -> Path:
    """Call ``write`` on a binary handle to a temporary file in path's folder, then rename it
    over ``path``; nothing is left behind on failure. ``mode`` sets the file's permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
