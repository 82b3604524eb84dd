"""Numba kernels of the numba backend: fused hidden layers, masks, output, and a whole epoch.

Importing this module creates the dispatchers but compiles nothing; each kernel compiles on its
first call for the argument types it gets (float32 or float64), with an on-disk cache when a
writable cache folder exists. No kernel runs in parallel itself; the evaluation's block
kernels release the GIL so that the backend can run several blocks on Python threads.

Matrix products call BLAS ``gemm`` through a function address given at run time (so compiled
kernels stay cacheable): NumPy's own OpenBLAS when it can be found (one thread pool for the
whole process, and its small-matrix kernels are faster), else SciPy's ``cython_blas``, which is
what numba's ``np.dot`` uses.

Every kernel follows the reference ops of ``base.Ops`` operation by operation, in the array's
dtype (constants are cast to it the way NumPy casts a Python scalar), and reduces over the batch
row by row, as NumPy's axis-0 reductions do: results match the reference to rounding, and are
bit-identical from run to run.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import rng

Array = np.ndarray

# ---- on-disk cache: in the package when writable, else a user cache folder, else none ----


def _writable_folder(folder: Path) -> bool:
    """True when files can be created in ``folder`` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _configure_cache() -> bool:
    """Pick where compiled kernels are cached; False when nowhere is writable."""
    chosen = numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR")
    if chosen:
        return _writable_folder(Path(chosen))
    if _writable_folder(Path(__file__).resolve().parent / "__pycache__"):
        return True
    fallback = Path.home() / ".cache" / "fastnn" / "numba"
    if _writable_folder(fallback):
        numba.config.CACHE_DIR = str(fallback)
        return True
    return False


CACHE_ENABLED = _configure_cache()


def jit(function: Any) -> Any:
    """Lazily compiled nopython kernel (NumPy's float error model, cached when possible)."""
    return numba.njit(cache=CACHE_ENABLED, error_model="numpy")(function)


def jit_nogil(function: Any) -> Any:
    """`jit` that releases the GIL, so that Python threads may run it at once."""
    return numba.njit(cache=CACHE_ENABLED, error_model="numpy", nogil=True)(function)


# ---- codes shared with the backend ----

ACTIVATION_CODES = {
    "sigmoid": 0, "tanh": 1, "relu": 2, "leaky_relu": 3,
    "identity": 4, "softplus": 5, "softsign": 6, "step": 7,
}
BN_OFF, BN_N, BN_SCALAR, BN_NODE = 0, 1, 2, 3
BATCH_NORM_CODES = {"off": BN_OFF, "n": BN_N, "bn": BN_SCALAR, "node": BN_NODE}
OUTPUT_SOFTMAX, OUTPUT_IDENTITY = 0, 1
OUTPUT_CODES = {"softmax_cross_entropy": OUTPUT_SOFTMAX, "identity_mse": OUTPUT_IDENTITY}
DECAY_NONE, DECAY_L1, DECAY_L2 = 0, 1, 2
DECAY_CODES = {None: DECAY_NONE, "l1": DECAY_L1, "l2": DECAY_L2}
BN_STD_FLOOR = 1e-7
LOG_FLOOR = 1e-7

# ---- BLAS gemm by address ----

BLAS_CBLAS64 = 1  # cblas interface, 64-bit integers: NumPy's bundled OpenBLAS
BLAS_FORTRAN32 = 2  # Fortran interface, 32-bit integers: SciPy's cython_blas
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


def _numpy_openblas_library() -> Any:
    """NumPy's bundled ILP64 OpenBLAS (a ctypes library), or None."""
    root = Path(np.__file__).resolve().parent
    candidates = [*root.parent.glob("numpy.libs/*openblas64*"), *root.glob(".dylibs/*openblas64*")]
    for path in sorted(candidates):
        try:
            library = ctypes.CDLL(str(path))
            library.scipy_cblas_sgemm64_, library.scipy_cblas_dgemm64_  # noqa: B018 - probe
        except (OSError, AttributeError):
            continue
        return library
    return None


def _numpy_openblas() -> tuple[int, int] | None:
    """(sgemm, dgemm) addresses of NumPy's bundled ILP64 OpenBLAS, when it has one."""
    library = _numpy_openblas_library()
    if library is None:
        return None
    return (ctypes.cast(library.scipy_cblas_sgemm64_, ctypes.c_void_p).value,
            ctypes.cast(library.scipy_cblas_dgemm64_, ctypes.c_void_p).value)


class BlasThreads:
    """Get/set the thread count of the BLAS the kernels call (a no-op when it is unknown)."""

    def __init__(self) -> None:
        library = _numpy_openblas_library() if blas_for("float64")[0] == BLAS_CBLAS64 else None
        self._get = getattr(library, "scipy_openblas_get_num_threads64_", None)
        self._set = getattr(library, "scipy_openblas_set_num_threads64_", None)
        if self._set is not None:
            self._set.argtypes = [ctypes.c_int]

    def get(self) -> int | None:
        return None if self._get is None or self._set is None else int(self._get())

    def set(self, count: int) -> None:
        if self._set is not None:
            self._set(count)


def _scipy_blas() -> tuple[int, int]:
    """(sgemm, dgemm) addresses of SciPy's cython_blas (Fortran interface, 32-bit ints)."""
    from scipy.linalg import cython_blas

    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    capsules = cython_blas.__pyx_capi__  # type: ignore[attr-defined]
    sgemm, dgemm = (capsules[name] for name in ("sgemm", "dgemm"))
    return get_pointer(sgemm, get_name(sgemm)), get_pointer(dgemm, get_name(dgemm))


_BLAS: dict[str, tuple[int, int]] = {}


def blas_for(dtype: Any) -> tuple[int, int]:
    """(blas kind, gemm address) for a float dtype, found once per process.

    Set FASTNN_NUMBA_BLAS=scipy to use SciPy's BLAS even when NumPy's can be found.
    """
    if not _BLAS:
        found = None if os.environ.get("FASTNN_NUMBA_BLAS") == "scipy" else _numpy_openblas()
        if found is not None:
            _BLAS["float32"], _BLAS["float64"] = (BLAS_CBLAS64, found[0]), (BLAS_CBLAS64, found[1])
        else:
            sgemm, dgemm = _scipy_blas()
            _BLAS["float32"], _BLAS["float64"] = (BLAS_FORTRAN32, sgemm), (BLAS_FORTRAN32, dgemm)
    return _BLAS[np.dtype(dtype).name]


def _array_data(context: Any, builder: Any, array_type: Any, value: Any, pointer_type: Any) -> Any:
    data = context.make_array(array_type)(context, builder, value).data
    return builder.bitcast(data, pointer_type)


@intrinsic
def _cblas64_gemm(typingctx: Any, address: Any, trans_a: Any, trans_b: Any, m: Any, n: Any,
                  k: Any, alpha: Any, a: Any, lda: Any, b: Any, ldb: Any, beta: Any, c: Any,
                  ldc: Any) -> Any:
    """Row-major cblas_?gemm(address) with 64-bit integers (NumPy's OpenBLAS)."""
    if not (isinstance(a, types.Array) and a.dtype == b.dtype == c.dtype == alpha == beta):
        return None
    signature = types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                           ldc)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        float_type = context.get_value_type(a.dtype)
        pointer = float_type.as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        function_type = ir.FunctionType(ir.VoidType(), [
            i32, i32, i32, i64, i64, i64, float_type, pointer, i64, pointer, i64, float_type,
            pointer, i64,
        ])
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, [
            ir.Constant(i32, _CBLAS_ROW_MAJOR), builder.trunc(args[1], i32),
            builder.trunc(args[2], i32), args[3], args[4], args[5], args[6],
            _array_data(context, builder, sig.args[7], args[7], pointer), args[8],
            _array_data(context, builder, sig.args[9], args[9], pointer), args[10], args[11],
            _array_data(context, builder, sig.args[12], args[12], pointer), args[13],
        ])
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _fortran32_gemm(typingctx: Any, address: Any, trans_a: Any, trans_b: Any, m: Any, n: Any,
                    k: Any, alpha: Any, a: Any, lda: Any, b: Any, ldb: Any, beta: Any, c: Any,
                    ldc: Any) -> Any:
    """Column-major Fortran ?gemm(address) with 32-bit integers (SciPy's cython_blas)."""
    if not (isinstance(a, types.Array) and a.dtype == b.dtype == c.dtype == alpha == beta):
        return None
    signature = types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                           ldc)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        float_type = context.get_value_type(a.dtype)
        pointer = float_type.as_pointer()
        i8, i32 = ir.IntType(8), ir.IntType(32)

        def slot(value: Any) -> Any:
            place = builder.alloca(value.type)
            builder.store(value, place)
            return place

        def char(flag: Any) -> Any:  # 'T' when the flag is set, else 'N'
            is_set = builder.icmp_signed("!=", flag, ir.Constant(flag.type, 0))
            letter = builder.select(is_set, ir.Constant(i8, ord("T")), ir.Constant(i8, ord("N")))
            return slot(letter)

        def integer(value: Any) -> Any:
            return slot(builder.trunc(value, i32))

        function_type = ir.FunctionType(ir.VoidType(), [
            i8.as_pointer(), i8.as_pointer(), i32.as_pointer(), i32.as_pointer(),
            i32.as_pointer(), pointer, pointer, i32.as_pointer(), pointer, i32.as_pointer(),
            pointer, pointer, i32.as_pointer(),
        ])
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, [
            char(args[1]), char(args[2]), integer(args[3]), integer(args[4]), integer(args[5]),
            slot(args[6]), _array_data(context, builder, sig.args[7], args[7], pointer),
            integer(args[8]), _array_data(context, builder, sig.args[9], args[9], pointer),
            integer(args[10]), slot(args[11]),
            _array_data(context, builder, sig.args[12], args[12], pointer), integer(args[13]),
        ])
        return context.get_dummy_value()

    return signature, codegen


@jit
def gemm(blas_kind, address, trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha * op(a) @ op(b) + beta * c on C-contiguous arrays (op: transpose when set).

    alpha and beta must have the arrays' dtype.
    """
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        for i in range(m):
            for j in range(n):
                c[i, j] = beta * c[i, j] if beta != 0 else beta
        return
    lda, ldb, ldc = max(a.shape[1], 1), max(b.shape[1], 1), max(c.shape[1], 1)
    if blas_kind == BLAS_CBLAS64:
        _cblas64_gemm(address, _CBLAS_TRANS if trans_a else _CBLAS_NO_TRANS,
                      _CBLAS_TRANS if trans_b else _CBLAS_NO_TRANS, m, n, k, alpha, a, lda, b,
                      ldb, beta, c, ldc)
    else:  # row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T
        _fortran32_gemm(address, int(trans_b), int(trans_a), n, m, k, alpha, b, ldb, a, lda,
                        beta, c, ldc)


# ---- counter-based random numbers (bit-identical to fastnn.rng) ----

_GOLDEN = np.uint64(rng.GOLDEN)
_MUL1 = np.uint64(rng.MUL1)
_MUL2 = np.uint64(rng.MUL2)
_SHIFT30, _SHIFT27, _SHIFT31, _SHIFT11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT53 = 1.0 / 9007199254740992.0


@jit
def mix64(value):
    """SplitMix64 finaliser of one uint64 (wrapping arithmetic)."""
    value = value ^ (value >> _SHIFT30)
    value = value * _MUL1
    value = value ^ (value >> _SHIFT27)
    value = value * _MUL2
    return value ^ (value >> _SHIFT31)


@jit
def fold_counter(key, counter):
    """One step of `rng.fold_key`: the key after folding in a non-negative counter."""
    return mix64((key ^ np.uint64(counter)) + _GOLDEN)


@jit
def fill_stream(key, values):
    """values[i] = the i-th value of `rng.uint64_stream(key, len(values))`."""
    for i in range(values.shape[0]):
        values[i] = mix64(np.uint64(i) * _GOLDEN + key)


@jit
def kth_smallest(values, rank):
    """The value of 0-based ``rank`` among distinct ``values`` (quickselect; reorders them)."""
    low, high = 0, values.shape[0] - 1
    while low < high:
        pivot = values[(low + high) // 2]
        i, j = low, high
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if rank <= j:
            high = j
        elif rank >= i:
            low = i
        else:
            break
    return values[rank]


@jit
def fill_article_mask(key, keep_count, scratch, mask):
    """mask = 1 at the keep_count smallest stream values of ``key``, else 0 (article mode)."""
    d = mask.shape[0]
    one, zero = mask.dtype.type(1.0), mask.dtype.type(0.0)
    if keep_count <= 0 or keep_count >= d:
        mask[:] = one if keep_count > 0 else zero
        return
    fill_stream(key, scratch)
    threshold = kth_smallest(scratch, keep_count - 1)
    fill_stream(key, scratch)  # kth_smallest reordered it
    for i in range(d):
        mask[i] = one if scratch[i] <= threshold else zero


@jit
def fill_bernoulli_multiplier(key, keep, on_value, multiplier):
    """multiplier[i, j] = on_value where uniform01 < keep, else 0 (the inverted-dropout draw)."""
    rows, cols = multiplier.shape
    zero = multiplier.dtype.type(0.0)
    for i in range(rows):
        for j in range(cols):
            bits = mix64(np.uint64(i * cols + j) * _GOLDEN + key) >> _SHIFT11
            uniform = np.float64(bits) * _UNIT53
            multiplier[i, j] = on_value if uniform < keep else zero


@jit
def article_mask(key, keep_count, mask):
    """Fill the (d,) article mask of ``key``."""
    fill_article_mask(key, keep_count, np.empty(mask.shape[0], np.uint64), mask)


# ---- activations, a row at a time (the branch sits outside the loop, so loops vectorise) ----

RELU, SIGMOID, TANH, LEAKY_RELU, IDENTITY, SOFTPLUS, SOFTSIGN, STEP = 2, 0, 1, 3, 4, 5, 6, 7


@jit
def activate_row(values, code, alpha, multiplier, out):
    """out[j] = act(values[j]) * multiplier[j]: the activation ``code`` (see ACTIVATION_CODES)."""
    one = values.dtype.type(1.0)
    zero = one - one
    d = values.shape[0]
    if code == RELU:  # NaN stays NaN, like np.maximum
        for j in range(d):
            v = values[j]
            out[j] = (zero if v < zero else v) * multiplier[j]
    elif code == SIGMOID:
        for j in range(d):
            out[j] = one / (one + np.exp(-values[j])) * multiplier[j]
    elif code == TANH:
        for j in range(d):
            out[j] = np.tanh(values[j]) * multiplier[j]
    elif code == LEAKY_RELU:
        for j in range(d):
            v = values[j]
            out[j] = (v if v > zero else alpha * v) * multiplier[j]
    elif code == IDENTITY:
        for j in range(d):
            out[j] = values[j] * multiplier[j]
    elif code == SOFTPLUS:
        for j in range(d):
            out[j] = np.log(one + np.exp(values[j])) * multiplier[j]
    elif code == SOFTSIGN:
        for j in range(d):
            v = values[j]
            out[j] = v / (one + np.abs(v)) * multiplier[j]
    else:  # step
        for j in range(d):
            out[j] = (one if values[j] > zero else zero) * multiplier[j]


@jit
def derivative_row(grad, values, code, alpha, multiplier, out):
    """out[j] = (grad[j] * multiplier[j]) * act'(values[j])."""
    one = values.dtype.type(1.0)
    zero = one - one
    d = values.shape[0]
    if code == RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else zero)
    elif code == SIGMOID or code == SOFTPLUS:  # softplus' is the sigmoid
        for j in range(d):
            s = one / (one + np.exp(-values[j]))
            out[j] = grad[j] * multiplier[j] * (s * (one - s) if code == SIGMOID else s)
    elif code == TANH:
        for j in range(d):
            th = np.tanh(values[j])
            out[j] = grad[j] * multiplier[j] * (one - th * th)
    elif code == LEAKY_RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else alpha)
    elif code == IDENTITY:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * one
    elif code == SOFTSIGN:
        for j in range(d):
            r = one + np.abs(values[j])
            out[j] = grad[j] * multiplier[j] * (one / (r * r))
    else:  # step: derivative 0
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * zero


@jit
def multiplier_row(multiplier, i, expanded):
    """Row i of a (1 or n, 1 or d) multiplier as a full (d,) row (``expanded`` is scratch)."""
    row = multiplier[i if multiplier.shape[0] > 1 else 0]
    if multiplier.shape[1] == expanded.shape[0]:
        return row
    expanded[:] = row[0]
    return expanded


# ---- fused hidden layer ----


@jit
def batch_statistics(u, mean, var):
    """Per-node batch mean and population variance, summed row by row (two passes)."""
    n, d = u.shape
    count = u.dtype.type(n)
    mean[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i]
        for j in range(d):
            mean[j] += row[j]
    for j in range(d):
        mean[j] = mean[j] / count
    var[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i]
        for j in range(d):
            deviation = row[j] - mean[j]
            var[j] += deviation * deviation
    for j in range(d):
        var[j] = var[j] / count


@jit
def normalise_row(u_row, mean, std, gamma, beta, has_gamma, u_hat_row, y_row):
    """u_hat = (u - mean) / std; y = gamma * u_hat + beta (y is u_hat without gamma)."""
    d = u_row.shape[0]
    for j in range(d):
        u_hat_row[j] = (u_row[j] - mean[j]) / std[j]
    if has_gamma:
        for j in range(d):
            y_row[j] = gamma[j] * u_hat_row[j] + beta[j]


@jit
def expand_parameter(values, d):
    """A (d,) copy of a (1,) or (d,) batch-norm parameter."""
    out = np.empty(d, values.dtype)
    if values.shape[0] == 1:
        out[:] = values[0]
    else:
        out[:] = values
    return out


@jit
def hidden_forward(u, act, alpha, bn, gamma, beta, has_gamma, batch_stats, mean, var, std,
                   store, u_hat, y, multiplier, z):
    """z = act(BN(u)) * multiplier, row by row.

    With BN and ``batch_stats`` the batch mean and population variance are written to mean and
    var, else read from them; std receives max(sqrt(var), 1e-7). With ``store`` u_hat and y
    receive the normalised values (pass y = u_hat without gamma); else they are not touched.
    ``multiplier`` is (1 or n, 1 or d): a scalar, a per-node mask or a per-element mask.
    """
    n, d = u.shape
    expanded = np.empty(d, u.dtype)
    if bn == BN_OFF:
        for i in range(n):
            activate_row(u[i], act, alpha, multiplier_row(multiplier, i, expanded), z[i])
        return
    if batch_stats:
        batch_statistics(u, mean, var)
    floor = u.dtype.type(BN_STD_FLOOR)
    for j in range(d):
        root = np.sqrt(var[j])
        std[j] = floor if root < floor else root  # NaN stays NaN, like np.maximum
    gamma_row, beta_row = expand_parameter(gamma, d), expand_parameter(beta, d)
    u_hat_scratch, y_scratch = np.empty(d, u.dtype), np.empty(d, u.dtype)
    for i in range(n):
        u_hat_row = u_hat[i] if store else u_hat_scratch
        y_row = y[i] if store else y_scratch
        normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat_row, y_row)
        activate_row(y_row if has_gamma else u_hat_row, act, alpha,
                     multiplier_row(multiplier, i, expanded), z[i])


@jit
def normalise(u, mean, std, gamma, beta, has_gamma, u_hat, y):
    """u_hat = (u - mean) / std and y = gamma * u_hat + beta for every row."""
    d = u.shape[1]
    gamma_row, beta_row = expand_parameter(gamma, d), expand_parameter(beta, d)
    for i in range(u.shape[0]):
        normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat[i], y[i])


@jit
def hidden_backward(dz, multiplier, act, alpha, bn, recompute, u, mean, std, forward_gamma,
                    forward_beta, u_hat, y, gamma, has_gamma, du, dgamma_nodes, dbeta_nodes):
    """du from dz through mask, activation derivative and BN (two passes with BN).

    u_hat and the activation's input come from u_hat and y (y is u_hat without gamma, u itself
    without BN) or, with ``recompute``, are rebuilt from u, mean, std, forward_gamma and
    forward_beta exactly as the forward pass built them. g = gamma * dy. With BN and gamma,
    dgamma_nodes/dbeta_nodes receive the per-node sums of u_hat*dy and dy.
    """
    n, d = dz.shape
    expanded = np.empty(d, dz.dtype)
    if bn == BN_OFF:
        for i in range(n):
            derivative_row(dz[i], y[i], act, alpha, multiplier_row(multiplier, i, expanded),
                           du[i])
        return
    gamma_row = expand_parameter(gamma, d)
    forward_gamma_row = expand_parameter(forward_gamma, d)
    forward_beta_row = expand_parameter(forward_beta, d)
    u_hat_scratch, y_scratch = np.empty(d, dz.dtype), np.empty(d, dz.dtype)
    mean_g = np.zeros(d, dz.dtype)
    mean_gu = np.zeros(d, dz.dtype)
    dgamma_nodes[:] = dz.dtype.type(0.0)
    dbeta_nodes[:] = dz.dtype.type(0.0)
    for i in range(n):
        if recompute:
            normalise_row(u[i], mean, std, forward_gamma_row, forward_beta_row, has_gamma,
                          u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
            y_row = y_scratch if has_gamma else u_hat_scratch
        else:
            u_hat_row, y_row = u_hat[i], y[i]
        du_row = du[i]
        derivative_row(dz[i], y_row, act, alpha, multiplier_row(multiplier, i, expanded), du_row)
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            mean_g[j] += g
            mean_gu[j] += g * u_hat_row[j]
        if has_gamma:
            for j in range(d):
                dgamma_nodes[j] += u_hat_row[j] * du_row[j]
                dbeta_nodes[j] += du_row[j]
    count = dz.dtype.type(n)
    for j in range(d):
        mean_g[j] = mean_g[j] / count
        mean_gu[j] = mean_gu[j] / count
    for i in range(n):
        if recompute:
            normalise_row(u[i], mean, std, forward_gamma_row, forward_beta_row, False,
                          u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
        else:
            u_hat_row = u_hat[i]
        du_row = du[i]
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            du_row[j] = (g - mean_g[j] - u_hat_row[j] * mean_gu[j]) / std[j]


@jit
def layer_parameter_grads(bn, dgamma_nodes, dbeta_nodes, dgamma, dbeta):
    """dgamma/dbeta from the node sums: as they are (BN(n)) or averaged over the nodes (BN)."""
    if bn == BN_SCALAR:
        d = dgamma_nodes.shape[0]
        total_gamma = dgamma_nodes.dtype.type(0.0)
        total_beta = dgamma_nodes.dtype.type(0.0)
        for j in range(d):
            total_gamma += dgamma_nodes[j]
            total_beta += dbeta_nodes[j]
        count = dgamma_nodes.dtype.type(d)
        dgamma[0] = total_gamma / count
        dbeta[0] = total_beta / count
    else:
        dgamma[:] = dgamma_nodes
        dbeta[:] = dbeta_nodes


# ---- affine, output, loss ----


@jit
def fill_rows(out, row):
    """Every row of out = row."""
    for i in range(out.shape[0]):
        out[i, :] = row


@jit
def affine(blas_kind, address, x, w, b, u):
    """u = x W + b (u starts as the bias rows; BLAS adds the product to it)."""
    fill_rows(u, b)
    one = u.dtype.type(1.0)
    gemm(blas_kind, address, False, False, one, x, w, one, u)


@jit
def column_sums(a, out):
    """out[j] = sum over rows of a[:, j], row by row."""
    out[:] = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[i, j]


@jit
def affine_backward(blas_kind, address, x, w, du, need_dx, dw, db, dx):
    """dW = x^T du, db = column sums of du, dx = du W^T when ``need_dx``."""
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    gemm(blas_kind, address, True, False, one, x, du, zero, dw)
    column_sums(du, db)
    if need_dx:
        gemm(blas_kind, address, False, True, one, du, w, zero, dx)


@jit
def output_forward(u, output, y):
    """Row softmax with the row maximum subtracted, or identity."""
    n, d = u.shape
    for i in range(n):
        if output == OUTPUT_IDENTITY:
            y[i, :] = u[i, :]
            continue
        top = u[i, 0]
        for j in range(1, d):
            top = max(top, u[i, j])
        total = u.dtype.type(0.0)
        for j in range(d):
            e = np.exp(u[i, j] - top)
            y[i, j] = e
            total += e
        for j in range(d):
            y[i, j] = y[i, j] / total


@jit
def loss(y, t, output):
    """Cross-entropy or MSE of a batch, summed in float64 (returned as float64)."""
    n, d = y.shape
    floor = y.dtype.type(LOG_FLOOR)
    total = 0.0
    for i in range(n):
        for j in range(d):
            if output == OUTPUT_IDENTITY:
                diff = y[i, j] - t[i, j]
                total += diff * diff
            elif t[i, j] != 0 or not np.isfinite(y[i, j]):  # 0 * log(...) is 0 unless NaN
                value = floor if y[i, j] < floor else y[i, j]
                total += t[i, j] * np.log(value)
    if output == OUTPUT_IDENTITY:
        return 0.5 * total / n
    return -total / n


@jit
def output_grad(y, t, du):
    """du = (y - t) / N."""
    n, d = y.shape
    count = y.dtype.type(n)
    for i in range(n):
        for j in range(d):
            du[i, j] = (y[i, j] - t[i, j]) / count


# ---- parameter update ----


@jit
def sgd_weights(w, dw, rate, decay, lam):
    """w -= rate * (dW + weight-decay gradient) (L1: lam * sign(W), L2: lam * W)."""
    flat_w, flat_dw = w.reshape(-1), dw.reshape(-1)
    zero = w.dtype.type(0.0)
    if decay == DECAY_L1:
        for i in range(flat_w.shape[0]):
            value = flat_w[i]
            sign = lam if value > zero else (-lam if value < zero else lam * value)
            flat_w[i] -= rate * (flat_dw[i] + sign)
    elif decay == DECAY_L2:
        for i in range(flat_w.shape[0]):
            flat_w[i] -= rate * (flat_dw[i] + lam * flat_w[i])
    else:
        for i in range(flat_w.shape[0]):
            flat_w[i] -= rate * flat_dw[i]


@jit
def sgd_vector(p, grad, rate):
    """p -= rate * grad."""
    for j in range(p.shape[0]):
        p[j] -= rate * grad[j]


# ---- a sparse first layer: CSR inputs (the zeros of x are skipped, not multiplied) ----


@jit_nogil
def count_nonzeros(x, counts):
    """counts[i] = the number of nonzero entries of row i (NaN counts: it is not zero)."""
    zero = x.dtype.type(0.0)
    total = 0
    for i in range(x.shape[0]):
        row = x[i]
        count = 0
        for j in range(x.shape[1]):
            if row[j] != zero:
                count += 1
        counts[i] = count
        total += count
    return total


@jit_nogil
def fill_csr(x, indptr, indices, values):
    """indices/values of x's nonzeros row by row, in column order (indptr already filled)."""
    zero = x.dtype.type(0.0)
    for i in range(x.shape[0]):
        row = x[i]
        p = indptr[i]
        for j in range(x.shape[1]):
            if row[j] != zero:
                indices[p] = j
                values[p] = row[j]
                p += 1


@jit
def sparse_row_product(indices, values, low, high, w, out):
    """out = the sum over p in low..high of values[p] * w[indices[p]] (four rows a pass)."""
    m = out.shape[0]
    out[:] = out.dtype.type(0.0)
    p = low
    while p + 4 <= high:
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        w0, w1 = w[indices[p]], w[indices[p + 1]]
        w2, w3 = w[indices[p + 2]], w[indices[p + 3]]
        for k in range(m):
            out[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * w2[k] + v3 * w3[k])
        p += 4
    while p < high:
        v0, w0 = values[p], w[indices[p]]
        for k in range(m):
            out[k] += v0 * w0[k]
        p += 1


@jit
def sparse_affine_rows(indptr, indices, values, w, b, u):
    """u[i] = x[i] W + b for the CSR rows of x (indptr has len(u) + 1 entries)."""
    for i in range(u.shape[0]):
        row = u[i]
        sparse_row_product(indices, values, indptr[i], indptr[i + 1], w, row)
        for k in range(row.shape[0]):
            row[k] += b[k]


@jit
def sparse_block(indptr, indices, values, start, scale, w, b, u):
    """u[i] = (x[start + i] * scale) W + b for the CSR rows of x (the evaluation's layer 1)."""
    one = u.dtype.type(1.0)
    scaled = np.empty(w.shape[0] if scale != one else 0, u.dtype)
    for i in range(u.shape[0]):
        row = u[i]
        low, high = indptr[start + i], indptr[start + i + 1]
        if scale == one:
            sparse_row_product(indices, values, low, high, w, row)
        else:
            for p in range(low, high):
                scaled[p - low] = values[p] * scale
            sparse_row_product(indices[low:high], scaled, 0, high - low, w, row)
        for k in range(row.shape[0]):
            row[k] += b[k]


@jit
def sparse_batch(indptr, indices, values, order, start, multiplier, batch_ptr, batch_idx,
                 batch_val):
    """The CSR rows of x[order[start:start+n]] * multiplier (n = len(batch_ptr) - 1).

    Entries whose product is exactly 0 (a dropped input) are left out; the rest are the values
    the reference's dense x * multiplier holds.
    """
    n = batch_ptr.shape[0] - 1
    zero = batch_val.dtype.type(0.0)
    per_element = multiplier.shape[1] > 1
    per_row = multiplier.shape[0] > 1
    scalar = multiplier[0, 0]
    q = 0
    batch_ptr[0] = 0
    for i in range(n):
        source = order[start + i]
        mask_row = multiplier[i if per_row else 0]
        for p in range(indptr[source], indptr[source + 1]):
            j = indices[p]
            value = values[p] * (mask_row[j] if per_element else scalar)
            if value != zero:
                batch_idx[q] = j
                batch_val[q] = value
                q += 1
        batch_ptr[i + 1] = q


@jit
def gather_targets(t, order, start, t_batch):
    """t_batch = t[order[start:start+n]]."""
    for i in range(t_batch.shape[0]):
        source, target = t[order[start + i]], t_batch[i]
        for j in range(target.shape[0]):
            target[j] = source[j]


@jit
def all_finite(a):
    """True when a (2-d) holds no inf or NaN."""
    zero = a.dtype.type(0.0)
    finite = True
    for i in range(a.shape[0]):
        row = a[i]
        for j in range(row.shape[0]):
            finite &= row[j] - row[j] == zero  # NaN (not 0) for inf and NaN
    return finite


@jit
def sparse_weight_update(batch_ptr, batch_idx, batch_val, du, w, eta, decay, lam, col_ptr,
                         col_row, col_val, acc, dw):
    """W -= eta * (x^T du + weight-decay gradient of the old W), x the batch's CSR rows.

    The batch is transposed to columns first (counting sort), so each row j of x^T du is
    summed once, over the batch rows in order. Without weight decay only the rows of W that
    the batch touches change (x^T du is 0 elsewhere); with it ``dw`` receives all of x^T du
    and `sgd_weights` updates every row. True when W is finite afterwards.
    """
    n = batch_ptr.shape[0] - 1
    d, m = w.shape
    dtype = w.dtype
    zero = dtype.type(0.0)
    nnz = batch_ptr[n]
    col_ptr[:] = 0
    for q in range(nnz):
        col_ptr[batch_idx[q] + 1] += 1
    for j in range(d):
        col_ptr[j + 1] += col_ptr[j]
    fill = col_ptr[:d].copy()
    for i in range(n):
        for q in range(batch_ptr[i], batch_ptr[i + 1]):
            j = batch_idx[q]
            col_row[fill[j]] = i
            col_val[fill[j]] = batch_val[q]
            fill[j] += 1
    finite = True
    for j in range(d):
        low, high = col_ptr[j], col_ptr[j + 1]
        if low == high:
            if decay != DECAY_NONE:
                dw[j, :] = zero
            continue
        acc[:] = zero
        p = low
        while p + 4 <= high:
            v0, v1, v2, v3 = col_val[p], col_val[p + 1], col_val[p + 2], col_val[p + 3]
            d0, d1 = du[col_row[p]], du[col_row[p + 1]]
            d2, d3 = du[col_row[p + 2]], du[col_row[p + 3]]
            for k in range(m):
                acc[k] += (v0 * d0[k] + v1 * d1[k]) + (v2 * d2[k] + v3 * d3[k])
            p += 4
        while p < high:
            v0, d0 = col_val[p], du[col_row[p]]
            for k in range(m):
                acc[k] += v0 * d0[k]
            p += 1
        if decay != DECAY_NONE:
            dw[j, :] = acc
            continue
        row = w[j]
        for k in range(m):
            row[k] -= eta * acc[k]
            finite &= row[k] - row[k] == zero
    if decay != DECAY_NONE:
        sgd_weights(w, dw, eta, decay, lam)
        return all_finite(w)
    return finite


# ---- one whole epoch ----


@jit
def gather_batch(x, t, order, start, multiplier, z0, t_batch):
    """z0 = x[order[start:start+n]] * input multiplier, t_batch = the matching targets."""
    n, d = z0.shape
    masked = multiplier.shape[0] > 1 or multiplier.shape[1] > 1
    expanded = np.empty(d, z0.dtype)
    for i in range(n):
        source, target = x[order[start + i]], z0[i]
        if masked:
            mask_row = multiplier_row(multiplier, i, expanded)
            for j in range(d):
                target[j] = source[j] * mask_row[j]
        else:
            for j in range(d):
                target[j] = source[j]
        source, target = t[order[start + i]], t_batch[i]
        for j in range(target.shape[0]):
            target[j] = source[j]


@jit
def softmax_grad(u, t, output, du):
    """du = (output(u) - t) / N, row by row (y is not kept)."""
    n, d = u.shape
    count = u.dtype.type(n)
    output_forward(u, output, du)
    for i in range(n):
        for j in range(d):
            du[i, j] = (du[i, j] - t[i, j]) / count


@jit
def train_epoch(x, t, order, weights, biases, gammas, betas, running_means,
                running_vars, batch_size, act, alpha, bn, output, decay, lam, eta, bn_rate,
                inverted, keep_ratios, keep_counts, key_prefix, update_running, momentum,
                momentum_rest, blas_kind, address, sparse, indptr, indices, values):
    """Every SGD step of one epoch, as ``Network.train_step`` does them, updating in place.

    weights/biases/gammas/betas/running_* are tuples with one entry per layer (gammas, betas
    and running_* have dummies past the hidden layers). lam, eta, bn_rate, alpha, momentum and
    momentum_rest are scalars of the dtype; ``key_prefix`` is fold_key(seed, dropout, epoch).
    Each layer is updated as soon as its gradients exist (nothing later reads its old values);
    without weight decay BLAS adds -eta x^T du to W directly.

    With ``sparse`` (indptr/indices/values: x in CSR form) the first layer's product and
    weight gradient skip x's zeros (`sparse_batch`, `sparse_weight_update`); a step whose W1
    or first-layer du is not finite goes the dense way (0 * inf is NaN there). Returns how many
    steps took the sparse path.
    """
    n_layers = len(weights)
    n_rows = order.shape[0]
    dtype = x.dtype
    one, zero = dtype.type(1.0), dtype.type(0.0)
    minus_eta = -eta
    has_gamma = bn == BN_SCALAR or bn == BN_NODE
    sizes = np.empty(n_layers + 1, np.int64)
    sizes[0] = weights[0].shape[0]
    for k in range(n_layers):
        sizes[k + 1] = weights[k].shape[1]
    rows = min(batch_size, n_rows)
    widest = sizes.max()

    # buffers; index k = layer k (0: the input)
    z_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    u_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    u_hat_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    y_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    du_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    dz_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    mean_buf = [np.zeros(sizes[k], dtype) for k in range(n_layers + 1)]
    var_buf = [np.ones(sizes[k], dtype) for k in range(n_layers + 1)]
    std_buf = [np.ones(sizes[k], dtype) for k in range(n_layers + 1)]
    dw_buf = [np.empty((sizes[k], sizes[k + 1]), dtype) for k in range(n_layers)]
    db = np.empty(widest, dtype)
    dgamma_nodes = np.empty(widest, dtype)
    dbeta_nodes = np.empty(widest, dtype)
    dgamma = np.empty(widest, dtype)
    dbeta = np.empty(widest, dtype)
    multiplier = [np.ones((1, 1), dtype) for _ in range(n_layers)]
    for k in range(n_layers):
        if keep_ratios[k] < 1.0:
            multiplier[k] = np.empty((rows if inverted else 1, sizes[k]), dtype)
    scratch = np.empty(widest, np.uint64)
    t_batch = np.empty((rows, t.shape[1]), dtype)
    # the sparse first layer: a batch's CSR rows, its columns, a row of x^T du
    d_in, d_first = sizes[0], sizes[1]
    capacity = rows * d_in if sparse else 0
    batch_ptr = np.zeros(rows + 1, np.int64)
    batch_idx = np.empty(capacity, np.int32)
    batch_val = np.empty(capacity, dtype)
    col_ptr = np.empty(d_in + 1, np.int64)
    col_row = np.empty(capacity, np.int64)
    col_val = np.empty(capacity, dtype)
    acc = np.empty(d_first, dtype)
    w1_finite = sparse and all_finite(weights[0])
    sparse_steps = 0

    for step in range((n_rows + batch_size - 1) // batch_size):
        start = step * batch_size
        n = min(batch_size, n_rows - start)
        # the dropout multipliers of (epoch, step, layer)
        step_key = fold_counter(key_prefix, step)
        for k in range(n_layers):
            if keep_ratios[k] < 1.0:
                key = fold_counter(step_key, k)
                if inverted:
                    on_value = one / dtype.type(keep_ratios[k])
                    fill_bernoulli_multiplier(key, keep_ratios[k], on_value, multiplier[k][:n])
                else:
                    fill_article_mask(key, keep_counts[k], scratch[: sizes[k]], multiplier[k][0])
        use_sparse = sparse and w1_finite
        if use_sparse:
            sparse_batch(indptr, indices, values, order, start, multiplier[0],
                         batch_ptr[: n + 1], batch_idx, batch_val)
            gather_targets(t, order, start, t_batch[:n])
            sparse_steps += 1
        else:
            gather_batch(x, t, order, start, multiplier[0], z_buf[0][:n], t_batch[:n])
        # forward
        for k in range(1, n_layers + 1):
            u = u_buf[k][:n]
            if k == 1 and use_sparse:
                sparse_affine_rows(batch_ptr[: n + 1], batch_idx, batch_val, weights[0],
                                   biases[0], u)
            else:
                fill_rows(u, biases[k - 1])
                gemm(blas_kind, address, False, False, one, z_buf[k - 1][:n], weights[k - 1],
                     one, u)
            if k < n_layers:
                y = y_buf[k][:n] if has_gamma else u_hat_buf[k][:n]
                hidden_forward(u, act, alpha, bn, gammas[k - 1], betas[k - 1], has_gamma, True,
                               mean_buf[k], var_buf[k], std_buf[k], True, u_hat_buf[k][:n], y,
                               multiplier[k], z_buf[k][:n])
        du = du_buf[n_layers][:n]
        softmax_grad(u_buf[n_layers][:n], t_batch[:n], output, du)
        # backward
        for k in range(n_layers, 0, -1):
            w = weights[k - 1]
            z_prev = z_buf[k - 1][:n]
            if k > 1:
                dz = dz_buf[k - 1][:n]
                gemm(blas_kind, address, False, True, one, du, w, zero, dz)
            column_sums(du, db[: sizes[k]])
            if k == 1 and use_sparse and all_finite(du):
                w1_finite = sparse_weight_update(batch_ptr[: n + 1], batch_idx, batch_val, du,
                                                 w, eta, decay, lam, col_ptr, col_row, col_val,
                                                 acc, dw_buf[0])
            elif k == 1 and sparse:  # the dense way; x's batch rows are needed now
                if use_sparse:
                    gather_batch(x, t, order, start, multiplier[0], z_buf[0][:n], t_batch[:n])
                if decay == DECAY_NONE:
                    gemm(blas_kind, address, True, False, minus_eta, z_prev, du, one, w)
                else:
                    gemm(blas_kind, address, True, False, one, z_prev, du, zero, dw_buf[0])
                    sgd_weights(w, dw_buf[0], eta, decay, lam)
                w1_finite = all_finite(w)
            elif decay == DECAY_NONE:
                gemm(blas_kind, address, True, False, minus_eta, z_prev, du, one, w)
            else:
                gemm(blas_kind, address, True, False, one, z_prev, du, zero, dw_buf[k - 1])
                sgd_weights(w, dw_buf[k - 1], eta, decay, lam)
            sgd_vector(biases[k - 1], db[: sizes[k]], eta)
            if k > 1:
                h = k - 1
                if bn == BN_OFF:
                    y_h = u_buf[h][:n]
                elif has_gamma:
                    y_h = y_buf[h][:n]
                else:
                    y_h = u_hat_buf[h][:n]
                du_hidden = du_buf[h][:n]
                hidden_backward(dz, multiplier[h], act, alpha, bn, False, u_buf[h][:n],
                                mean_buf[h], std_buf[h], gammas[h - 1], betas[h - 1],
                                u_hat_buf[h][:n], y_h, gammas[h - 1], has_gamma, du_hidden,
                                dgamma_nodes[: sizes[h]], dbeta_nodes[: sizes[h]])
                if has_gamma and bn_rate != zero:
                    size = gammas[h - 1].shape[0]
                    layer_parameter_grads(bn, dgamma_nodes[: sizes[h]], dbeta_nodes[: sizes[h]],
                                          dgamma[:size], dbeta[:size])
                    sgd_vector(gammas[h - 1], dgamma[:size], bn_rate)
                    sgd_vector(betas[h - 1], dbeta[:size], bn_rate)
                du = du_hidden
        if update_running and bn != BN_OFF:
            for k in range(1, n_layers):
                running_mean, running_var = running_means[k - 1], running_vars[k - 1]
                for j in range(sizes[k]):
                    running_mean[j] = momentum * running_mean[j] + momentum_rest * mean_buf[k][j]
                    running_var[j] = momentum * running_var[j] + momentum_rest * var_buf[k][j]
    return sparse_steps


# ---- evaluation of a whole set, a block of rows at a time ----


@jit
def argmax_row(row):
    """Index of the row's first maximum (the first NaN when there is one), like np.argmax."""
    best, top = 0, row[0]
    if np.isnan(top):
        return 0
    for j in range(1, row.shape[0]):
        value = row[j]
        if np.isnan(value):
            return j
        if value > top:
            best, top = j, value
    return best


@jit
def hidden_eval_rows(u, act, alpha, bn, mean, std, gamma_row, beta_row, has_gamma, scale_row,
                     u_hat_scratch, y_scratch, z):
    """z = act(BN(u)) * scale row by row with fixed statistics (z may be u itself)."""
    d = u.shape[1]
    u_hat_scratch, y_scratch = u_hat_scratch[:d], y_scratch[:d]
    for i in range(u.shape[0]):
        if bn == BN_OFF:
            activate_row(u[i], act, alpha, scale_row, z[i])
        else:
            normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat_scratch,
                          y_scratch)
            activate_row(y_scratch if has_gamma else u_hat_scratch, act, alpha, scale_row, z[i])


@jit
def floored_std(var, std):
    """std = max(sqrt(var), 1e-7) (NaN stays NaN, like np.maximum)."""
    floor = var.dtype.type(BN_STD_FLOOR)
    for j in range(var.shape[0]):
        root = np.sqrt(var[j])
        std[j] = floor if root < floor else root


@jit
def output_rows(u, t, output, predicted, start):
    """Output function of u in place; predicted[start + i] = argmax of row i; the summed loss
    terms (float64: sum of t log max(y, 1e-7), or of (y - t)^2)."""
    n, d = u.shape
    floor = u.dtype.type(LOG_FLOOR)
    total = 0.0
    if output != OUTPUT_IDENTITY:
        output_forward(u, output, u)
    for i in range(n):
        row, target = u[i], t[i]
        predicted[start + i] = argmax_row(row)
        if output == OUTPUT_IDENTITY:
            for j in range(d):
                diff = row[j] - target[j]
                total += diff * diff
        else:
            for j in range(d):
                if target[j] != 0 or not np.isfinite(row[j]):  # 0 * log(...) is 0 unless NaN
                    value = floor if row[j] < floor else row[j]
                    total += target[j] * np.log(value)
    return total


@jit
def input_rows(x, start, n, scale, scratch):
    """Rows start..start+n of x times the input scale (x's own rows, uncopied, for scale 1)."""
    if scale == x.dtype.type(1.0):
        return x[start:start + n]
    z = scratch[:n]
    for i in range(n):
        source, target = x[start + i], z[i]
        for j in range(x.shape[1]):
            target[j] = source[j] * scale
    return z


@jit_nogil
def evaluate_block(x, t, start, n, weights, biases, first, full, act, alpha, bn, has_gamma,
                   output, scales, means, stds, gamma_rows, beta_rows, blas_kind, address,
                   predicted, sparse, indptr, indices, values):
    """Rows start..start+n from layer ``first`` on: the summed loss terms (float64) of their
    outputs; predicted[start:start+n] receives their classes.

    ``first`` is 1 (from the input x) or L (the output layer): then hidden layer L - 1's
    pre-activations of these rows are in full[L - 2], and are normalised and activated here
    (in place). Row k - 1 of means/stds/gamma_rows/beta_rows belongs to hidden layer k;
    scales[k] multiplies layer k's output (k = 0: the input, scales[0, 0]). Blocks are
    independent: threads may run them at once (the GIL is released). With ``sparse`` layer 1
    reads x's CSR form (indptr/indices/values) and skips its zeros.
    """
    n_layers = len(weights)
    dtype = x.dtype
    one = dtype.type(1.0)
    widest = max(scales.shape[1], x.shape[1])
    u_hat_scratch, y_scratch = np.empty(widest, dtype), np.empty(widest, dtype)
    if first == 1 and sparse:
        d = weights[0].shape[1]
        z = np.empty((n, d), dtype)
        sparse_block(indptr, indices, values, start, scales[0, 0], weights[0], biases[0], z)
        if n_layers > 1:
            hidden_eval_rows(z, act, alpha, bn, means[0, :d], stds[0, :d], gamma_rows[0, :d],
                             beta_rows[0, :d], has_gamma, scales[1, :d], u_hat_scratch,
                             y_scratch, z)
        first = 2
    elif first == 1:
        z = input_rows(x, start, n, scales[0, 0],
                       np.empty((n if scales[0, 0] != one else 0, x.shape[1]), dtype))
    else:
        h, d = first - 2, weights[first - 2].shape[1]
        z = full[first - 2][start:start + n]
        hidden_eval_rows(z, act, alpha, bn, means[h, :d], stds[h, :d], gamma_rows[h, :d],
                         beta_rows[h, :d], has_gamma, scales[first - 1, :d], u_hat_scratch,
                         y_scratch, z)
    for k in range(first, n_layers + 1):
        d = weights[k - 1].shape[1]
        u = np.empty((n, d), dtype)
        fill_rows(u, biases[k - 1])
        gemm(blas_kind, address, False, False, one, z, weights[k - 1], one, u)
        if k < n_layers:
            h = k - 1
            hidden_eval_rows(u, act, alpha, bn, means[h, :d], stds[h, :d], gamma_rows[h, :d],
                             beta_rows[h, :d], has_gamma, scales[k, :d], u_hat_scratch,
                             y_scratch, u)
        z = u
    return output_rows(z, t[start:start + n], output, predicted, start)


@jit
def evaluate_setup(weights, gammas, betas, running_means, running_vars, bn, batch_stats,
                   scales, scale_rows, means, stds, gamma_rows, beta_rows):
    """Fill the per-layer rows `evaluate_block` reads (row k - 1: hidden layer k, all (widest,)).

    scale_rows[0, 0] is the input's scale, scale_rows[k] hidden layer k's; gamma/beta rows are
    the expanded parameters; with fixed (running) statistics, means and stds receive them.
    """
    n_layers = len(weights)
    dtype = scale_rows.dtype
    scale_rows[:, :] = dtype.type(1.0)
    means[:, :] = dtype.type(0.0)
    stds[:, :] = dtype.type(1.0)
    scale_rows[0, 0] = scales[0]
    for k in range(1, n_layers):
        scale_rows[k, :] = scales[k]
    for k in range(n_layers):
        d = weights[k].shape[1]
        gamma_rows[k, :d] = expand_parameter(gammas[k], d)
        beta_rows[k, :d] = expand_parameter(betas[k], d)
    if bn != BN_OFF and not batch_stats:
        for k in range(n_layers - 1):
            d = weights[k].shape[1]
            means[k, :d] = running_means[k]
            floored_std(running_vars[k], stds[k, :d])


@jit_nogil
def pre_activation_block(x, start, n, k, weights, biases, full, act, alpha, bn, has_gamma,
                         scale_rows, means, stds, gamma_rows, beta_rows, blas_kind, address,
                         sparse, indptr, indices, values):
    """full[k - 1][start:start+n] = hidden layer k's pre-activations of those rows; for k > 1
    full[k - 2]'s rows are first normalised and activated in place (their statistics known).
    With ``sparse`` layer 1 reads x's CSR form (see `evaluate_block`)."""
    dtype = x.dtype
    one = dtype.type(1.0)
    if k == 1 and sparse:
        sparse_block(indptr, indices, values, start, scale_rows[0, 0], weights[0], biases[0],
                     full[0][start:start + n])
        return
    if k == 1:
        scale = scale_rows[0, 0]
        z = input_rows(x, start, n, scale, np.empty((n if scale != one else 0, x.shape[1]), dtype))
    else:
        h, d = k - 2, weights[k - 2].shape[1]
        z = full[k - 2][start:start + n]
        hidden_eval_rows(z, act, alpha, bn, means[h, :d], stds[h, :d], gamma_rows[h, :d],
                         beta_rows[h, :d], has_gamma, scale_rows[k - 1, :d], np.empty(d, dtype),
                         np.empty(d, dtype), z)
    u = full[k - 1][start:start + n]
    fill_rows(u, biases[k - 1])
    gemm(blas_kind, address, False, False, one, z, weights[k - 1], one, u)


@jit
def whole_set_statistics(u, mean, std):
    """Mean (row by row, in the dtype: the reference's axis-0 mean) and floored std of u."""
    var = np.empty(u.shape[1], u.dtype)
    batch_statistics(u, mean, var)
    floored_std(var, std)
