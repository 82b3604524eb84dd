"""CUDA C kernels of the GPU backend, and two ways to check them without a GPU.

Sources: ``kernels/*.cu`` (``fastnn/kernels/`` in a wheel), one file per fused op, each
opening with a comment that gives its exact argument list, shapes and launch configuration;
``kernels/fastnn_common.cuh`` holds the shared device helpers. Every kernel is
``extern "C" __global__`` with a float (``_f32``) and a double (``_f64``) variant; ``T``
below is float or double to match. Scalars must be NumPy scalars of the exact C type
(``numpy.int32`` for ``int``, ``numpy.uint64`` for the 64-bit mask key, ``numpy.float64`` for
``double keep``, T for T): CuPy passes a Python int as 8 bytes.

Loading one (the CuPy backend)::

    from fastnn.cuda import module_args
    code, options, names = module_args("hidden_forward")
    module = cupy.RawModule(code=code, options=options, name_expressions=names)
    kernel = module.get_function("hidden_forward_f64")
    kernel(grid, block, args)

Kernels (file: signature, then grid and block of the intended launch):

masks.cu
    article_mask(u64 key, const u64* key_at, int d, int keep_count, T* mask)
        (ceil(d/256)), (256)
    bernoulli_mask(u64 key, long long count, double keep, T on_value, T* out)      1-D
    dropout_input(const T* x, int n, int d, int drop, u64 key, const u64* key_at,
                  double keep, const T* mask, T* out)                             1-D
hidden_forward.cu
    hidden_forward(const T* u, int n, int d, int act, T alpha, int bn, const T* gamma,
                   const T* beta, int stats, T* mean, T* var, T* std_dev, int drop, u64 key,
                   const u64* key_at, int keep_count, double keep, T* mask_out, T* y_out,
                   T* u_hat_out, T* z)
        (ceil(d/32), R), (32, 8)
hidden_backward.cu
    hidden_backward(const T* dz, int n, int d, int act, T alpha, const T* y, int bn,
                    const T* gamma, const T* u_hat, const T* std_dev, int drop, u64 key,
                    const u64* key_at, int keep_count, double keep, T* du, T* dgamma_nodes,
                    T* dbeta_nodes)
        (ceil(d/32), R), (32, 8)
output_loss.cu
    output_loss_grad(const T* u, const T* t, int n, int c, int output, T* y, T* du,
                     T* loss)                                                (1), (128)
eval_output.cu
    eval_output(const T* u, const T* t, int n, int c, int output, const int* labels,
                int* predicted, double* loss_sum, u64* correct)    (ceil(n/256)), (256)
colstats.cu
    col_partial_sums(const T* u, int n, int d, const T* center, T* partial)
        (ceil(d/32), R), (32, 8)
    col_stats_finalize(const T* partial, int blocks, int n, int d, T* out, T* std_dev)  1-D
running_stats.cu
    update_running(T* mean, T* var, const T* batch_mean, const T* batch_var, int d,
                   double momentum)                                                1-D
sgd.cu
    sgd_weight(T* w, const T* dw, long long count, T rate, int decay, T lam)         1-D
    sgd_vector(T* p, const T* g, long long count, T rate)                            1-D
optimizer.cu
    optimizer_update(T* param, const T* grad, T* first, T* second, long long count,
                     int rule, T rate, int decay, T lam, T momentum, T beta1,
                     T beta1_rest, T beta2, T beta2_rest, T eps, T correction_first,
                     T correction_second, const double* rate_at,
                     const double* corrections_at)                                     1-D
reduce.cu
    sum_reduce(const T* x, long long count, int transform, T scale, T divisor, T* out,
               int accumulate)                                               (1), (256)
gemm.cu
    gemm_nn, gemm_nt, gemm_tn(int M, int N, int K, T alpha, const T* A, int lda,
                              const T* B, int ldb, T beta, T* C, int ldc, const T* bias)
        (ceil(N/16), ceil(M/16)), (16, 16)
step.cu
    step_begin(u64* counter, const double* table, int n_values, long long* current,
               u64* keys, int n_keys, double* values)                          (1), (1)
    gather_batch(const T* x, const T* t, const long long* order,
                 const long long* current, int batch_size, int n, int d, int c, T* x_out,
                 T* t_out)                                                          1-D

(``u64`` is ``unsigned long long``; "1-D": any 1-D launch, grid-stride loops.) The codes of
``act``, ``bn``, ``stats``, ``drop``, ``output``, ``decay`` and ``transform`` are the tables of
`fastnn.backends.codes` (the enums of ``fastnn_common.cuh``). The GPU backend fills each
launch's arguments by these parameter names (`fastnn.backends.cuda.launches`).
The "bn" variant's scalar dgamma/dbeta is hidden_backward's node sums through sum_reduce
(divisor d). A mask key is a launch argument (``key``) or, in a training step, read from
device memory (``key_at``: the keys step_begin makes from a step counter kept there), and so
are the optimiser's per-step rate and corrections (``rate_at``, ``corrections_at``): every
launch of a step then has the same arguments at every step, and the step is captured once as
a CUDA graph and replayed (`fastnn.backends.cuda.training`).

Checking without a GPU:

* `fastnn.cuda.shim` compiles a source unchanged with g++ and ``cpu_shim.h`` and runs it on
  the CPU (threads as fibers, real barriers, shuffles, guard bytes, reverse thread order);
  ``tests/test_cuda_kernels.py`` compares every kernel with the NumPy reference ops there
  (and on a GPU through CuPy when there is one).
* `fastnn.cuda.nvrtc` compiles each source with NVRTC from the ``cuda-check`` extra, with the
  options CuPy would use (``tests/test_cuda_compile.py``).
"""

from __future__ import annotations

from .sources import (
    C_TYPES,
    CUPY_ADDED_OPTIONS,
    RAWMODULE_OPTIONS,
    kernel_dir,
    kernel_files,
    kernel_names,
    kernel_signatures,
    module_args,
    read_source,
)

#: the launch shapes the kernels are written for (see each file's opening comment)
COLUMN_BLOCK = (32, 8, 1)  # hidden_forward, hidden_backward, col_partial_sums
LINEAR_BLOCK = (256, 1, 1)  # masks, eval_output, col_stats_finalize, sgd, sum_reduce, running
OUTPUT_BLOCK = (128, 1, 1)  # output_loss_grad
GEMM_TILE = 16  # gemm: block (16, 16, 1)

__all__ = [
    "COLUMN_BLOCK",
    "C_TYPES",
    "CUPY_ADDED_OPTIONS",
    "GEMM_TILE",
    "LINEAR_BLOCK",
    "OUTPUT_BLOCK",
    "RAWMODULE_OPTIONS",
    "kernel_dir",
    "kernel_files",
    "kernel_names",
    "kernel_signatures",
    "module_args",
    "read_source",
]
