"""BLAS ``gemm`` called from compiled kernels through a function address given at run time.

Compiled kernels stay cacheable because the address is an argument. NumPy's own bundled
OpenBLAS is used when it can be found (one thread pool for the whole process, and its
small-matrix kernels are faster), else SciPy's ``cython_blas``, which is what numba's
``np.dot`` uses. Set FASTNN_NUMBA_BLAS=scipy to force SciPy's.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .common import Blas, jit

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


def blas_for(dtype: Any) -> Blas:
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
    return Blas(*_BLAS[np.dtype(dtype).name])


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
def gemm(blas, trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha * op(a) @ op(b) + beta * c (op: transpose when set), by the BLAS of the `Blas`
    record ``blas``. alpha and beta must have the arrays' dtype. The arrays' rows must be
    contiguous (a C-contiguous array or a block of its columns): the leading dimensions are
    their row strides.
    """
    blas_kind, address = blas.kind, blas.address
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        for i in range(m):
            for j in range(n):
                c[i, j] = beta * c[i, j] if beta != 0 else beta
        return
    lda = max(a.strides[0] // a.itemsize, a.shape[1], 1)
    ldb = max(b.strides[0] // b.itemsize, b.shape[1], 1)
    ldc = max(c.strides[0] // c.itemsize, c.shape[1], 1)
    if blas_kind == BLAS_CBLAS64:
        _cblas64_gemm(address, _CBLAS_TRANS if trans_a else _CBLAS_NO_TRANS,
                      _CBLAS_TRANS if trans_b else _CBLAS_NO_TRANS, m, n, k, alpha, a, lda, b,
                      ldb, beta, c, ldc)
    else:  # row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T
        _fortran32_gemm(address, int(trans_b), int(trans_a), n, m, k, alpha, b, ldb, a, lda,
                        beta, c, ldc)
