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
are linked as before. A driver loaded from the disk cache needs the very code it was compiled
against in the JIT first (numba's symbol names carry a number of the process that compiled
them), or loading it would abort the process on an unresolved symbol. So a driver's cache entry
(`DriverCache`) carries its callees' own entries, those of the drivers it calls and theirs
first: loading it loads each one whose code this process does not hold yet (and gives it to
the callee's dispatcher when that has none for those types), then the driver. An entry in
another form, or one whose callees cannot all be loaded, is a miss: the driver compiles anew.

numba has no option for this: `install` wraps `CPUCodeLibrary.finalize` for the libraries
`light_pipeline` registers as drivers; with a numba that lacks it, drivers link as usual.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import weakref
from typing import Any

from numba.core.caching import CompileResultCacheImpl

from . import light_pipeline
from .shared_cache import KernelCache as LockedCache

#: a kernel's name in every process: (module, qualified name, `closure_digest`)
KernelKey = tuple[str, str, str]
#: a callee as a driver's cache entry carries it: its kernel, argument types, the symbol a
#: driver calls, the symbols its own code calls by symbol, and its numba cache entry
Carried = tuple[KernelKey, tuple[Any, ...], str, tuple[str, ...], tuple[Any, ...]]
#: the callee libraries of kernels: library -> (its kernel's key, argument types, its result)
_CALLEES: weakref.WeakKeyDictionary[Any, tuple[KernelKey, tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary())
#: what a compiled or loaded result keeps beside it, by its library: "payload" (its cache
#: entry), and for a driver "carried" and "calls" (see `Carried`), "kept" (results it loaded)
_KEPT: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
#: every kernel, by its `KernelKey`: where a driver's loaded callee finds its dispatcher
_KERNELS: dict[KernelKey, Any] = {}
_LOCK = threading.Lock()
#: marks a driver's cache entry that carries its callees
_ENTRY_TAG = "fastnn-driver-calls-by-symbol-2"
_installed = False


def closure_digest(function: Any) -> str:
    """A digest of what ``function``'s closure holds that is the same in every process: a
    kernel by its module, name, code and own closure (numba would pickle it with an id of its
    process), any other value by its pickle (the epoch loop's choices)."""
    digest = hashlib.sha256()
    for cell in function.__closure__ or ():
        value = cell.cell_contents
        inner = getattr(value, "py_func", None)
        if inner is not None:
            digest.update(f"kernel {inner.__module__} {inner.__qualname__} ".encode())
            digest.update(inner.__code__.co_code)
            digest.update(closure_digest(inner).encode())
        else:
            digest.update(pickle.dumps(value))
    return digest.hexdigest()


def kernel_key(function: Any, qualname: str | None = None) -> KernelKey:
    """The `KernelKey` of the kernel of ``function`` (named ``qualname`` if given)."""
    return (function.__module__, qualname or function.__qualname__, closure_digest(function))


def register_kernel(key: KernelKey, kernel: Any) -> None:
    """Make ``kernel`` (with a ``from_kernels`` sibling) findable by its key."""
    with _LOCK:
        _KERNELS[key] = kernel


def mark_callee(cres: Any, key: KernelKey) -> None:
    """Record that ``cres`` (compiled or loaded) is the code of kernel ``key`` as other kernels
    call it: a driver calls it by symbol."""
    with _LOCK:
        _CALLEES[cres.library] = (key, tuple(cres.signature.args), cres)


def _callee_of(library: Any) -> tuple[KernelKey, tuple[Any, ...], Any] | None:
    with _LOCK:
        return _CALLEES.get(library)


def _kept(cres: Any) -> dict[str, Any]:
    """What ``cres`` keeps beside it (made empty on first use)."""
    with _LOCK:
        return _KEPT.setdefault(cres.library, {})


def _find_kernel(key: KernelKey) -> Any | None:
    """The kernel registered as ``key``, if its module is imported (a module's kernels
    register on import; the epoch loop's, when the loop of its choices is made)."""
    with _LOCK:
        return _KERNELS.get(key)


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


def _called_symbols(library: Any) -> tuple[str, ...]:
    """The kernels' symbols a driver's compiled module calls (declared, not defined)."""
    return tuple(sorted(function.name for function in library._final_module.functions
                        if function.is_declaration and function.name.startswith("_ZN")))


def _carried(cres: Any) -> list[Carried]:
    """What a cache entry of the driver ``cres`` carries: every callee it calls by symbol,
    those a callee driver calls before that driver (each once)."""
    known = _kept(cres).get("carried")
    if known is not None:
        return known
    carried: dict[str, Carried] = {}
    for library in cres.library._linking_libraries:
        found = _callee_of(library)
        if found is None:
            continue
        key, args, callee = found
        kept = _kept(callee)
        payload = kept.get("payload")
        if payload is None:
            raise LookupError(f"no cache entry of {key[1]}")  # its own save was skipped
        calls: tuple[str, ...] = ()
        if "carried" in kept or light_pipeline.is_driver(callee.library):
            for item in _carried(callee):
                carried.setdefault(item[2], item)
            calls = kept.get("calls") or _called_symbols(callee.library)
        carried.setdefault(callee.fndesc.mangled_name,
                           (key, args, callee.fndesc.mangled_name, calls, payload))
    return list(carried.values())


def _load_carried(target_context: Any, carried: list[Carried]) -> list[Any] | None:
    """Load each carried callee whose code this process lacks (in order); the results kept
    alive by the driver, or None when one fails to load."""
    from numba.core.compiler import CompileResult

    engine = target_context.codegen()._engine
    kept = []
    for position, (key, args, symbol, calls, payload) in enumerate(carried):
        if engine.is_symbol_defined(symbol):
            continue
        if not all(engine.is_symbol_defined(name) for name in calls):
            return None  # it calls what is not here: loading it would abort
        callee = CompileResult._rebuild(target_context, *payload)
        _kept(callee).update(payload=payload)
        if calls:
            _kept(callee).update(carried=carried[:position], calls=calls)
        kernel = _find_kernel(key)
        sibling = kernel.from_kernels if kernel is not None else None
        if sibling is not None and args not in sibling.overloads:
            target_context.insert_user_function(callee.entry_point, callee.fndesc,
                                                [callee.library])
            sibling.add_overload(callee)
        kept.append(callee)
    return kept


class KernelCacheImpl(CompileResultCacheImpl):
    """numba's cache entries; each result keeps its entry (a driver's entry carries it)."""

    def reduce(self, cres: Any) -> Any:
        payload = super().reduce(cres)
        _kept(cres)["payload"] = payload
        return payload

    def rebuild(self, target_context: Any, payload: Any) -> Any:
        cres = super().rebuild(target_context, payload)
        _kept(cres)["payload"] = payload
        return cres


class _DriverCacheImpl(KernelCacheImpl):
    """A driver's cache entry: numba's, with the callees it calls by symbol."""

    def reduce(self, cres: Any) -> Any:
        entry = super().reduce(cres)
        return (_ENTRY_TAG, entry, _carried(cres), _called_symbols(cres.library))

    def check_cachable(self, cres: Any) -> bool:
        try:
            _carried(cres)
        except LookupError:
            return False  # a callee was not saved: loading this one could not find it
        return super().check_cachable(cres)

    def rebuild(self, target_context: Any, payload: Any) -> Any:
        if not (isinstance(payload, tuple) and len(payload) == 4
                and payload[0] == _ENTRY_TAG):
            return None  # another form of entry: compiled afresh
        _, entry, carried, calls = payload
        kept = _load_carried(target_context, carried)
        engine = target_context.codegen()._engine
        if kept is None or not all(engine.is_symbol_defined(name) for name in calls):
            return None
        cres = super().rebuild(target_context, entry)
        _kept(cres).update(carried=carried, calls=calls, kept=kept)
        return cres


class KernelCache(LockedCache):
    """The cache of a kernel (`shared_cache`), whose results keep their entries."""

    _impl_class = KernelCacheImpl


class DriverCache(KernelCache):
    """The cache of a driver: its entries carry its callees' (loaded first), and are keyed by
    a `closure_digest` (a driver may hold another in its closure)."""

    _impl_class = _DriverCacheImpl

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        return (sig, codegen.magic_tuple(), (code, closure_digest(self._py_func)))
