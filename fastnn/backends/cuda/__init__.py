"""The CUDA kernel path: a `Plan` executed through the kernels of ``kernels/*.cu``.

One folder, one concern per module:

- `ops` — `KernelOps`, the per-op overrides (each a guard, a kernel launch, ``super()``
  otherwise);
- `training` — the whole epoch: a step's launch list, built once per epoch and batch size;
- `evaluation` — a whole set, layer by layer, read back once;
- `launches` — launches built by kernel and parameter name from the signatures the ``.cu``
  sources declare (the per-step mask key found by its name, ``key``);
- `device` — `KernelDevice` (array module, module loader, read-back), `shim_device` (the CPU
  shim) and `KernelBase` (kernels loaded on first use, buffers, what the kernels take);
- `cupy_device` — `CupyOps`, the registered "cupy" backend (imports CuPy).

Kernels load on first use (`KernelOps.warm_up` loads and runs every one a plan needs), never
at import.
"""

from __future__ import annotations

from .device import KernelDevice, shim_device
from .launches import KERNEL_FILES, ArgumentError, Launch, Launches
from .ops import KernelOps

__all__ = [
    "KERNEL_FILES",
    "ArgumentError",
    "KernelDevice",
    "KernelOps",
    "Launch",
    "Launches",
    "shim_device",
]
