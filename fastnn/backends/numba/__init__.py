"""The numba backend: `NumbaOps` (NumPy arrays, the hot ops as compiled kernels, a compiled
epoch and evaluation).

| module | holds |
|---|---|
| `ops` | `NumbaOps`: each per-op override a guard, a kernel call, ``super()`` otherwise |
| `training` | the whole-epoch program: step record, buffers, the two-thread runner |
| `evaluation` | the blocked evaluation, whole-set statistics, the block runner |
| `fit` | the guards behind the fallbacks, and the `Layers` record of a plan |
| `inputs` | the CSR form of sparse inputs, and the sparse/dense first-layer choice |
| `batch_norm_cache` | the lazily built batch-norm cache, and what the fused backward reads |
| `kernels` | the compiled kernels, one module per concern |

Importing it compiles nothing: kernels compile on first use, or in `NumbaOps.warm_up`.
"""

from __future__ import annotations

import numba  # noqa: F401 - an ImportError here is turned into an install hint by the registry

from .ops import NumbaOps

__all__ = ["NumbaOps"]
