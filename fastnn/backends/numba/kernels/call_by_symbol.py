"""Driver kernels call their callees' compiled code by symbol instead of linking a copy of it.

numba links every callee's LLVM module into its caller's and makes machine code of the whole:
a driver (the epoch loop, evaluation's blocks: loops around calls to other kernels) made machine
code again of every kernel it calls, each of which had made its own already. That was the
largest share of a first run's compile left (the epoch loop's linked module: 3.2 s of machine
code and 0.8 s of module passes, of about 20 s). The light pipeline (`light_pipeline`) runs no
inliner on a driver, so the linked copies were only ever called, never inlined: calling the
callee's own code computes the same numbers, and the driver's module holds its own code only.

The driver's module keeps a declaration of each callee; the JIT resolves it to the callee's
library, which its dispatcher keeps alive. Libraries that are not kernels (numba's own helpers)
are linked as before. A driver loaded from the disk cache needs its callees in the JIT first,
or loading it would abort on an unresolved symbol: its cache entry lists them (kernel and
argument types), and `DriverCache` compiles each (a cache hit) before it loads the driver. An
entry that is not in that form, or a callee that cannot be found, is a cache miss: the driver
is compiled afresh.

numba has no option for this: `install` wraps `CPUCodeLibrary.finalize` for the libraries
`light_pipeline` registers as drivers; with a numba that lacks it, drivers link as usual.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from typing import Any

from numba.core.caching import CompileResultCacheImpl, FunctionCache

from . import light_pipeline

#: the callee libraries of kernels: library -> (module, kernel's qualified name, argument types)
_CALLEES: weakref.WeakKeyDictionary[Any, tuple[str, str, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary())
#: every kernel, by (module, qualified name): where a cached driver finds its callees
_KERNELS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()
#: marks a driver's cache entry that lists its callees
_ENTRY_TAG = "fastnn-driver-calls-by-symbol-1"
_installed = False


def register_kernel(module: str, qualname: str, kernel: Any) -> None:
    """Make ``kernel`` (with a ``from_kernels`` sibling) findable by a cached driver."""
    with _LOCK:
        _KERNELS[(module, qualname)] = kernel


def mark_callee(library: Any, module: str, qualname: str, args: tuple[Any, ...]) -> None:
    """Record that ``library`` is kernel ``module.qualname``'s code for argument types
    ``args`` (as other kernels call it): a driver calls it by symbol."""
    with _LOCK:
        _CALLEES[library] = (module, qualname, args)


def _callee_of(library: Any) -> tuple[str, str, tuple[Any, ...]] | None:
    with _LOCK:
        return _CALLEES.get(library)


def _find_kernel(module: str, qualname: str) -> Any | None:
    """The kernel registered as ``module.qualname`` (its module imported if need be)."""
    with _LOCK:
        kernel = _KERNELS.get((module, qualname))
    if kernel is None:
        try:
            importlib.import_module(module)
        except ImportError:
            return None
        with _LOCK:
            kernel = _KERNELS.get((module, qualname))
    return kernel


def install() -> None:
    """Wrap numba's `CPUCodeLibrary.finalize` (once; nothing when numba's differs)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
    try:
        from numba.core.codegen import CPUCodeLibrary

        finalize = CPUCodeLibrary.finalize
    except (ImportError, AttributeError):
        return

    def _finalize(self: Any) -> None:
        linked = getattr(self, "_linking_libraries", None)
        if not linked or not light_pipeline.is_driver(self):
            finalize(self)
            return
        called = [library for library in linked if _callee_of(library) is not None]
        if not called:
            finalize(self)
            return
        for library in called:  # what linking would have carried over
            self._reload_init.update(library._reload_init)
        self._linking_libraries = [library for library in linked
                                   if _callee_of(library) is None]
        try:
            finalize(self)
        finally:
            self._linking_libraries = linked

    CPUCodeLibrary.finalize = _finalize


class _DriverCacheImpl(CompileResultCacheImpl):
    """A driver's cache entry: numba's, with the callees it calls by symbol."""

    def reduce(self, cres: Any) -> Any:
        callees = [callee for library in cres.library._linking_libraries
                   if (callee := _callee_of(library)) is not None]
        return (_ENTRY_TAG, super().reduce(cres), tuple(dict.fromkeys(callees)))

    def rebuild(self, target_context: Any, payload: Any) -> Any:
        if not (isinstance(payload, tuple) and len(payload) == 3
                and payload[0] == _ENTRY_TAG):
            return None  # another form of entry: compiled afresh
        _, entry, callees = payload
        for module, qualname, args in callees:
            kernel = _find_kernel(module, qualname)
            if kernel is None:
                return None
            kernel.from_kernels.compile(args)
        return super().rebuild(target_context, entry)


class DriverCache(FunctionCache):
    """numba's function cache for a driver: its callees are compiled before it is loaded."""

    _impl_class = _DriverCacheImpl
