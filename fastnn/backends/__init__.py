"""Backend registry: `get_backend(name)` and `available()`; optional backends import lazily."""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from ..errors import BackendUnavailable, ConfigError
from .base import HiddenCache, HiddenSpec, Ops


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    extra: str | None  # the pip extra that installs what it needs
    needs: str | None  # the package it needs


_REGISTRY: dict[str, _Entry] = {
    "numpy": _Entry("fastnn.backends.numpy_backend", "NumpyOps", None, None),
    "numba": _Entry("fastnn.backends.numba", "NumbaOps", "numba", "numba"),
    "cupy": _Entry("fastnn.backends.cuda.cupy_device", "CupyOps", "cuda12", "cupy"),
}
_INSTANCES: dict[str, Ops] = {}
_LOCK = threading.Lock()  # one instance per backend, even when threads ask at once


def names() -> tuple[str, ...]:
    """Every registered backend name."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Ops:
    """The (shared) ops instance of a backend; a clear error when it cannot load."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(_REGISTRY)}")
    with _LOCK:
        return _load(name)


def _load(name: str) -> Ops:
    if name not in _INSTANCES:
        entry = _REGISTRY[name]
        try:
            module = importlib.import_module(entry.module)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or entry.needs
            hint = {
                "numba": ": pip install numba scipy",
                "cupy": ": pip install cupy-cuda12x (or cupy-cuda13x for CUDA 13)",
            }.get(name, "")
            raise BackendUnavailable(
                f"backend {name!r} needs {missing or entry.needs}{hint} ({exc})"
            ) from None
        ops = getattr(module, entry.cls)()
        check = getattr(ops, "check_available", None)
        if check is not None:
            check()
        _INSTANCES[name] = ops
    return _INSTANCES[name]


def available() -> dict[str, str | None]:
    """For each backend: None when it loads, else the reason it cannot."""
    status: dict[str, str | None] = {}
    for name in _REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailable as exc:
            status[name] = str(exc)
        else:
            status[name] = None
    return status


__all__ = ["HiddenCache", "HiddenSpec", "Ops", "available", "get_backend", "names"]
