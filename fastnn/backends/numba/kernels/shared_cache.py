"""numba's disk cache, safe for two processes that compile into it at once.

numba keeps one index file per function (its compiled signatures -> data files) and updates it
by reading it, adding an entry and writing it back. Two processes that save entries of one
function at the same moment (a first run and its compile helper, `compile_helper`, or two
runs of a cluster's workers) could each write an index without the other's entry, or both
give one data-file number to different signatures. `KernelCache` takes an advisory lock on
the index (``<index>.lock``, `fcntl.flock`) around each save, so that the read, the new entry
and the write are one step (where the lock cannot be had, the save is numba's own). Loading
needs no lock: numba replaces files whole (a reader sees the old index or the new one) and
treats a data file not yet written as a miss. Where `fcntl` is
missing (Windows), saves are numba's own and `LOCKS` is False (no compile helper runs there).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from numba.core.caching import FunctionCache, IndexDataCacheFile

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: whether saves are locked here (POSIX)
LOCKS = fcntl is not None
#: the suffix of an index's lock file
LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) where the file system
    allows it; where it does not (a lock file another user made, a mount without ``flock``),
    the save goes on unlocked, as numba's own."""
    descriptor = None
    if fcntl is not None:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:
            descriptor = None
    if descriptor is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            os.close(descriptor)
            descriptor = None
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


class _LockedIndexFile(IndexDataCacheFile):
    """numba's index and data files, each save under the index's lock."""

    def save(self, key: Any, data: Any) -> None:
        with _locked(self._index_path + LOCK_SUFFIX):
            super().save(key, data)


class KernelCache(FunctionCache):
    """numba's function cache with `_LockedIndexFile`."""

    def __init__(self, py_func: Any) -> None:
        super().__init__(py_func)
        self._cache_file = _LockedIndexFile(
            cache_path=self._cache_path, filename_base=self._impl.filename_base,
            source_stamp=self._impl.locator.get_source_stamp())
