"""Numba kernels of the numba backend, one module per concern.

| module | holds |
|---|---|
| `common` | ``jit`` decorators, the on-disk cache, the floors, the typed records kernels take |
| `blas` | BLAS ``gemm`` by address (NumPy's OpenBLAS, else SciPy's) |
| `simd` | vector registers (LLVM intrinsics) and prefetch |
| `elementary` | an exp without a libm call, so that its loops vectorise |
| `masks` | dropout masks from their keys, bit-identical to `fastnn.rng` |
| `layers` | one kernel per reference op: hidden layer forward/backward, affine, output, update |
| `sparse` | the first layer over a CSR input |
| `sync` | the spin barrier between the threads that share a step |
| `epoch` | a training epoch: a compiled loop around the kernels above, in two parts |
| `evaluate` | whole-set evaluation in blocks |

The integer codes of the plan's choices come from `fastnn.backends.codes` (the one table).
Importing creates dispatchers and compiles nothing.
"""
