"""Atomic file writes: a temporary file beside the target, flushed, fsynced, renamed over it
(only ever over a regular file: links are followed, devices and pipes written in place)."""

from __future__ import annotations

import glob
import os
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK_LOCK = threading.Lock()
#: the name ending of the temporary files `write_atomically` writes
PART_SUFFIX = ".part"
#: what reading a damaged or cut .npz file (a zip archive) can raise, besides `OSError`
ARCHIVE_ERRORS = (ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


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
    over ``path``. On any failure (a full disk, an interrupt) the temporary file is removed, a
    file already at ``path`` stays as it was, and the error is raised. ``mode`` sets the file's
    permissions (default: those of the file it replaces, else what the umask gives a new file,
    0o666 & ~umask, as ``open`` would).

    Only a regular file (or nothing) is ever replaced: a symbolic link is written through to
    the file it points to (the link stays), and anything else that exists at ``path`` (a
    character device such as /dev/null, a FIFO) is written in place. Returns the path
    written."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        existing: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        existing = None
    special = existing is not None and not stat.S_ISREG(existing)
    if special:  # a device or a pipe: never renamed over (open raises for a folder)
        with open(path, "wb") as handle:
            write(handle)
            handle.flush()
        return path
    if mode is None:
        mode = stat.S_IMODE(existing) if existing is not None else 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    try:
        try:
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(fd, mode)
            handle = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with handle:
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


def remove_partial_files(path: str | Path) -> list[Path]:
    """Remove temporary files that `write_atomically` left for ``path`` when its process was
    killed mid-write (nothing else removes them); return what was removed. Call it only when
    no other process is writing ``path``."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{PART_SUFFIX}"):
        try:
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
    return removed



def os_reason(exc: OSError) -> str:
    """The short reason of an `OSError` ("No space left on device"), for one-line messages."""
    return exc.strerror or str(exc) or exc.__class__.__name__
