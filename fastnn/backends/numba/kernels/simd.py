"""Explicit SIMD vectors for the kernels whose loops numba cannot keep in registers, and a
prefetch hint for the rows a kernel will read next.

A `Vector` is one 64-byte LLVM vector of the array's float type (16 float32 or 8 float64
lanes: one AVX-512 register, two AVX2 ones; LLVM splits it on narrower machines, the results
are the same). Kernels hold their accumulators in `Vector` locals, which LLVM keeps in
registers, and touch memory only through `load`/`store` of a contiguous row. `muladd` rounds
the product and the sum separately (no fused multiply-add), like the scalar code and NumPy's
element-wise ``a + v * w``, so a lane computes exactly what a scalar loop would.

`prefetch` asks the CPU to bring the cache line of one array element closer (LLVM's prefetch
intrinsic: a hint that changes no result and never faults).

Nothing compiles at import: the intrinsics are typed and compiled with the kernels that call
them.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 64


class Vector(types.Type):
    """The numba type of a 64-byte vector of ``dtype`` (float32 or float64)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vector({dtype}x{self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    """A `Vector` is an LLVM ``<lanes x float|double>`` value."""

    def __init__(self, dmm: Any, fe_type: Vector) -> None:
        element = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _is_float_row(row: Any) -> bool:
    """A contiguous 1-d float32/float64 array (a vector moves consecutive elements)."""
    return (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype in (types.float32, types.float64))


def _element_pointer(context: Any, builder: Any, array_type: Any, array: Any,
                     indices: list[Any], vector_type: Any) -> Any:
    """A pointer to array[indices], typed as a pointer to ``vector_type``."""
    native = context.make_array(array_type)(context, builder, array)
    pointer = cgutils.get_item_pointer(context, builder, array_type, native, indices)
    return builder.bitcast(pointer, vector_type.as_pointer())


@intrinsic
def lanes(typingctx: Any, row: Any) -> Any:
    """How many elements of ``row``'s dtype one `Vector` holds (a compile-time constant)."""
    if not _is_float_row(row):
        return None
    count = Vector(row.dtype).lanes

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return context.get_constant(types.intp, count)

    return types.intp(row), codegen


@intrinsic
def zeros(typingctx: Any, like: Any) -> Any:
    """A `Vector` of +0.0 of ``like``'s dtype (a 1-d float array)."""
    if not _is_float_row(like):
        return None
    vector = Vector(like.dtype)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return ir.Constant(context.get_value_type(vector), None)

    return vector(like), codegen


@intrinsic
def load(typingctx: Any, row: Any, start: Any) -> Any:
    """row[start:start + lanes] as a `Vector` (contiguous 1-d row; the caller keeps it in
    bounds)."""
    if not _is_float_row(row) or not isinstance(start, types.Integer):
        return None
    vector = Vector(row.dtype)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vector_type = context.get_value_type(vector)
        pointer = _element_pointer(context, builder, sig.args[0], args[0], [args[1]],
                                   vector_type)
        return builder.load(pointer, align=row.dtype.bitwidth // 8)

    return vector(row, types.intp), codegen


@intrinsic
def load_row(typingctx: Any, matrix: Any, row: Any, start: Any) -> Any:
    """matrix[row, start:start + lanes] as a `Vector` (a C-contiguous 2-d array; no view is
    made; the caller keeps it in bounds)."""
    if (not isinstance(matrix, types.Array) or matrix.ndim != 2 or matrix.layout != "C"
            or matrix.dtype not in (types.float32, types.float64)
            or not isinstance(row, types.Integer) or not isinstance(start, types.Integer)):
        return None
    vector = Vector(matrix.dtype)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pointer = _element_pointer(context, builder, sig.args[0], args[0], [args[1], args[2]],
                                   context.get_value_type(vector))
        return builder.load(pointer, align=matrix.dtype.bitwidth // 8)

    return vector(matrix, types.intp, types.intp), codegen


@intrinsic
def store(typingctx: Any, row: Any, start: Any, value: Any) -> Any:
    """row[start:start + lanes] = value (a `Vector` of row's dtype)."""
    if (not _is_float_row(row) or not isinstance(start, types.Integer)
            or not isinstance(value, Vector) or value.dtype != row.dtype):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pointer = _element_pointer(context, builder, sig.args[0], args[0], [args[1]],
                                   args[2].type)
        builder.store(args[2], pointer, align=row.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(row, types.intp, value), codegen


@intrinsic
def muladd(typingctx: Any, acc: Any, scalar: Any, value: Any) -> Any:
    """acc + scalar * value, lane by lane, each operation rounded (never fused); the scalar has
    the vector's dtype."""
    if not isinstance(acc, Vector) or value != acc or scalar != acc.dtype:
        return None  # a scalar of another dtype would round differently from scalar code

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        total, factor, vector = args
        vector_type = vector.type
        index_type = ir.IntType(32)
        single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), factor,
                                        ir.Constant(index_type, 0))
        broadcast = builder.shuffle_vector(
            single, ir.Constant(vector_type, ir.Undefined),
            ir.Constant(ir.VectorType(index_type, vector_type.count), [0] * vector_type.count))
        return builder.fadd(total, builder.fmul(broadcast, vector))

    return acc(acc, scalar, value), codegen


@intrinsic
def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """Hint that array[index] (a 1-d array) will be read soon: its cache line is fetched into
    every cache level. Changes nothing; an index past the end is harmless (no fault)."""
    if not (isinstance(array, types.Array) and array.ndim == 1
            and isinstance(index, types.Integer)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        native = context.make_array(sig.args[0])(context, builder, args[0])
        address = builder.gep(native.data, [args[1]])
        byte_pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, ir.IntType(32),
                                                            ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0i8")
        int32 = ir.IntType(32)
        builder.call(function, [builder.bitcast(address, byte_pointer), int32(0), int32(3),
                                int32(1)])
        return context.get_dummy_value()

    return types.none(array, types.intp), codegen
