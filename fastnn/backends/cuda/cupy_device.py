"""The CuPy backend: the kernel path (`KernelOps`) on a GPU, CuPy arrays and ``cupy.RawModule``.

The CUDA C kernels (``kernels/*.cu``) are compiled by NVRTC through CuPy on first use (CuPy
caches them on disk), in `warm_up` when a `Trainer` runs; ops the kernels do not cover run as
the reference's CuPy array expressions. The same class runs on the CPU with NumPy arrays and
the CPU shim (`device.shim_device`), which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cupy  # an ImportError here is turned into an install hint by the registry

from .device import KernelDevice
from .ops import KernelOps


def cupy_device() -> KernelDevice:
    """CuPy arrays, ``cupy.RawModule`` modules; the current stream's work waited for on
    reading back."""

    def load(code: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        return cupy.RawModule(code=code, options=options, name_expressions=names)

    def synchronize() -> None:
        cupy.cuda.get_current_stream().synchronize()

    def capture(record: Callable[[], None]) -> Any:
        """A graph of the launches of ``record``, captured on a stream of its own (a graph
        launches on any stream: the epoch launches it on the current one), in the
        thread-local mode: an allocation or a wait in this thread during the capture is an
        error, not a silent part of the graph."""
        stream = cupy.cuda.Stream(non_blocking=True)
        runtime = cupy.cuda.runtime
        mode = getattr(runtime, "streamCaptureModeThreadLocal",
                       getattr(runtime, "streamCaptureModeRelaxed", None))
        with stream:
            stream.begin_capture(mode)
            try:
                record()
            except BaseException:
                try:  # end the capture, but report what broke it
                    stream.end_capture()
                except Exception:  # noqa: BLE001, S110 - the first error is the one to see
                    pass
                raise
            return stream.end_capture()

    return KernelDevice("cupy", cupy, load, cupy.asnumpy, synchronize, capture)


class CupyOps(KernelOps):
    """The kernel path on a CUDA device."""

    name = "cupy"
    xp = cupy

    def __init__(self) -> None:
        super().__init__(cupy_device())

    def check_available(self) -> None:
        """Fail with an actionable message when no CUDA device can be used."""
        from ...errors import BackendUnavailable

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means "not usable here"
            raise BackendUnavailable(
                f"backend 'cupy' found no usable CUDA device ({exc}); it needs an NVIDIA GPU, "
                "its driver and the CuPy build of that CUDA version "
                "(pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13)"
            ) from None
        if count < 1:
            raise BackendUnavailable(
                "backend 'cupy' found no CUDA device; it needs an NVIDIA GPU and its driver"
            )
