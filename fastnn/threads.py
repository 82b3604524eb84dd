"""CPU thread counts: how many CPUs this process may use, and a per-fit limit on BLAS threads.

The BLAS thread count is process-wide state. `blas_threads` sets it once for a block of work
(one fit) and restores it when the last such block in the process ends; while several fits run
at once (threads of a Dask worker) the smallest requested count holds, so no fit
oversubscribes the cores another one was given. Nothing here changes what a computation gives
on the numba backend (its products run on one BLAS thread); the numpy backend's products may
sum in another order with another thread count (see README, "Reproducibility").
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: the environment variable that sets the default thread count of a training
THREADS_ENV = "FASTNN_THREADS"


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 CFS), None when unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set, capped by the cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def check_threads(value: Any, source: str = "threads") -> int:
    """``value`` as a thread count >= 1, or a `ConfigError` naming ``source``."""
    if isinstance(value, str):
        try:
            if not value.isascii():  # int() reads full-width digits, "２"
                raise ValueError(value)
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{source} must be an integer >= 1; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source} must be an integer >= 1; got {value!r}")
    return value


class ThreadsCapped(UserWarning):
    """More threads were asked for than the process may use; it uses that many instead."""


def within_cpus(count: int, source: str = "threads") -> int:
    """``count``, or `usable_cpus` with a `ThreadsCapped` warning when it asks for more: a
    thread per CPU at most (more only wait for each other: a numpy epoch ran 90x slower at
    100000 threads)."""
    usable = usable_cpus()
    if count <= usable:
        return count
    warnings.warn(f"{source} {count} is more than the {usable} CPU(s) this process may use; "
                  f"using {usable}", ThreadsCapped, stacklevel=3)
    return usable


def default_threads() -> int:
    """``FASTNN_THREADS`` when set, else `usable_cpus`."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        return check_threads(text, THREADS_ENV)
    return usable_cpus()


class _Blas:
    """Get/set the thread count of NumPy's bundled OpenBLAS (a no-op when it cannot be found)."""

    def __init__(self) -> None:
        self._get: Any = None
        self._set: Any = None
        import numpy as np

        root = Path(np.__file__).resolve().parent
        candidates = [*root.parent.glob("numpy.libs/*openblas*"), *root.glob(".dylibs/*openblas*")]
        for path in sorted(candidates):
            try:
                library = ctypes.CDLL(str(path))
            except OSError:
                continue
            for suffix in ("64_", ""):
                get = getattr(library, f"scipy_openblas_get_num_threads{suffix}", None)
                put = getattr(library, f"scipy_openblas_set_num_threads{suffix}", None)
                if get is None or put is None:
                    get = getattr(library, f"openblas_get_num_threads{suffix}", None)
                    put = getattr(library, f"openblas_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    self._get, self._set = get, put
                    return

    def get(self) -> int | None:
        return None if self._get is None else int(self._get())

    def set(self, count: int) -> None:
        if self._set is not None:
            self._set(count)


_lock = threading.Lock()
_blas: _Blas | None = None
_active: list[int] = []  # the counts requested by the blocks running now
_saved: int | None = None  # the count before the first of them began


@contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Run the block with at most ``count`` BLAS threads (the smallest of all running blocks);
    the process's own count comes back when the last block ends."""
    global _blas, _saved
    count = check_threads(count)
    with _lock:
        if _blas is None:
            _blas = _Blas()
        if not _active:
            _saved = _blas.get()
        _active.append(count)
        _blas.set(min(_active))
    try:
        yield
    finally:
        with _lock:
            _active.remove(count)
            if _active:
                _blas.set(min(_active))
            elif _saved is not None:
                _blas.set(_saved)


def current_blas_threads() -> int | None:
    """The BLAS thread count now (None when it cannot be read)."""
    global _blas
    with _lock:
        if _blas is None:
            _blas = _Blas()
        return _blas.get()
