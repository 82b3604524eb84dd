"""Atomic file writes: a temporary file beside the target, flushed, fsynced, renamed over it."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc where possible, so it is never changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_atomically(
    path: str | Path, write: Callable[[BinaryIO], None], mode: int | None = None
) -> Path:
    """Call ``write`` on a binary handle to a temporary file in path's folder, then rename it
    over ``path``; nothing is left behind on failure. ``mode`` sets the file's permissions
    (default: what the umask gives a new file, 0o666 & ~umask, as ``open`` would)."""
    path = Path(path)
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
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


def check_writable_folder(folder: str | Path) -> None:
    """Create and remove a temporary file in ``folder``: an `OSError` if files cannot be
    written there (this works for root and for special file systems, unlike ``os.access``)."""
    fd, tmp = tempfile.mkstemp(prefix=".fastnn-write-test.", dir=folder)
    os.close(fd)
    os.unlink(tmp)
