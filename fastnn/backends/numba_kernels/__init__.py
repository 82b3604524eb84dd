"""Numba kernels of the numba backend, one module per concern.

| module | holds |
|---|---|
| `common` | ``jit`` decorators, the on-disk cache, codes of the plan's choices, records |
| `blas` | BLAS ``gemm`` by address (NumPy's OpenBLAS, else SciPy's) |
| `masks` | dropout masks from their keys, bit-identical to `fastnn.rng` |
| `layers` | one kernel per reference op: hidden layer forward/backward, affine, output, update |
| `sparse` | the first layer over a CSR input |
| `sync` | the spin barrier between the threads that share a step |
| `epoch` | a training epoch: a compiled loop around the kernels above, in two parts |
| `evaluate` | whole-set evaluation in blocks |

Importing creates dispatchers and compiles nothing.
"""
