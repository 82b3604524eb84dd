"""The CuPy backend: the reference ops on the GPU (``xp = cupy``).

CUDA C kernels for fused ops belong in the top-level ``kernels/`` folder and are compiled
lazily on first use; until one is added for an op, the reference definition runs as CuPy
array expressions.
"""

from __future__ import annotations

from typing import Any

import cupy  # noqa: F401 - an ImportError here is turned into an install hint by the registry

from .base import Ops


class CupyOps(Ops):
    """Reference ops on CuPy arrays."""

    name = "cupy"
    xp = cupy

    def check_available(self) -> None:
        """Fail with an actionable message when no CUDA device can be used."""
        from ..errors import BackendUnavailable

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means "not usable here"
            raise BackendUnavailable(
                f"backend 'cupy' found no usable CUDA device ({exc})"
            ) from None
        if count < 1:
            raise BackendUnavailable("backend 'cupy' found no CUDA device")

    def to_numpy(self, array: Any) -> Any:
        return cupy.asnumpy(array)

    def asarray(self, array: Any, dtype: str | None = None) -> Any:
        return cupy.array(array, dtype=dtype)
