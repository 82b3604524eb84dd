"""`Workspace`: the scratch one fit (or one library call) owns, never a shared backend.

A backend object is shared by every network in the process and by the threads of a Dask
worker; it keeps compiled kernels only. Whatever belongs to one run lives here: prepared forms
of that run's inputs (the numba backend's CSR form of a sparse training set), reused buffers,
counters of which path ran, and the thread count the run may use. Dropping the workspace drops
all of it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from ..threads import check_threads, default_threads, within_cpus

Array = Any


class Workspace:
    """Per-run scratch: prepared inputs, buffers, counters, thread count and backend options."""

    def __init__(self, threads: int | None = None, options: Mapping[str, Any] | None = None):
        #: CPU threads this run may use (BLAS and backend threads together)
        self.threads = default_threads() if threads is None else within_cpus(
            check_threads(threads))
        #: backend-specific settings of this run (e.g. the numba backend's sparse mode)
        self.options: dict[str, Any] = dict(options or {})
        #: how often each code path ran ("train_sparse", "evaluate_dense", ...); see `count`
        self.counters: Counter[str] = Counter()
        #: threads of ``threads`` busy elsewhere (training, while evaluation runs beside it)
        self.reserved_threads = 0
        self._lock = threading.Lock()
        self._prepared: dict[int, tuple[Array, Any]] = {}
        self._buffers: dict[tuple[Any, ...], Array] = {}

    @property
    def free_threads(self) -> int:
        """Threads an operation may use now: ``threads`` less those reserved, at least 1."""
        return max(1, self.threads - self.reserved_threads)

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter (safe while evaluation and training run in two threads)."""
        with self._lock:
            self.counters[name] += amount

    # ---- prepared forms of this run's input arrays ----
    def attach(self, array: Array, form: Any) -> None:
        """Remember a prepared form of ``array`` (held with the array itself, so an id is
        never mistaken for another array's)."""
        self._prepared[id(array)] = (array, form)

    def prepared(self, array: Array) -> Any | None:
        """The form attached to exactly this array object, else None."""
        entry = self._prepared.get(id(array))
        return entry[1] if entry is not None and entry[0] is array else None

    # ---- reused buffers ----
    def buffer(self, key: tuple[Any, ...], make: Callable[[], Array],
               fits: Callable[[Array], bool]) -> Array:
        """The buffer stored under ``key`` when ``fits`` accepts it, else a new one from
        ``make`` (stored for the next call). Key a buffer by what uses it: two threads of a
        run must not share one."""
        with self._lock:
            buffer = self._buffers.get(key)
            if buffer is None or not fits(buffer):
                buffer = self._buffers[key] = make()
            return buffer

    def clear(self) -> None:
        """Drop every prepared form and buffer."""
        self._prepared.clear()
        self._buffers.clear()
