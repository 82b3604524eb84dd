"""An exp that the compiler can vectorise: arithmetic only, no call into the C maths library.

numba compiles ``np.exp`` to a call of libm's exp for each element, which keeps every loop
around it scalar; the sigmoid of each hidden unit, forward and backward, then costs more than
the layer's product. `exp` here is the classic range reduction and polynomial, written so
that LLVM turns a loop of it into SIMD code. That pays only where the loop vectorises (an
element-wise loop such as the sigmoid's); a loop that sums in order (the softmax) stays scalar,
and there libm's exp is the faster.


- x = n ln 2 + r with n = floor(x log2(e) + 1/2) and |r| <= ln(2)/2, ln 2 split in two parts
  (Cody and Waite) so that r is exact;
- exp(r) by a polynomial: float32 the minimax one of Cephes' ``expf`` (degree 7 in all),
  float64 Taylor's to degree 13 (its remainder below 4e-18);
- times 2^n, as 2^h * 2^(n-h) with h = floor(n/2), each built from the bits of its exponent
  field: both factors are normal numbers, and only the last product rounds, to a subnormal,
  to the largest float or to inf as the true value does. x is first clamped to where exp
  rounds to 0 (float32 -104, float64 -746) or to inf (89, 710).

float32 results are within 1 ulp of the correctly rounded exp (NumPy's own float32 exp is not
always correctly rounded either: the two differ by more than 2 ulp on a few dozen of the 4e9
inputs), float64 results within 2 ulp of NumPy's (tests hold both there), subnormal results
included; at the edges it gives what NumPy gives: 0 and inf, NaN for NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def float_from_bits(typingctx: Any, bits: Any) -> Any:
    """The float whose bit pattern is ``bits`` (int32 -> float32, int64 -> float64)."""
    if bits == types.int32:
        result = types.float32
    elif bits == types.int64:
        result = types.float64
    else:
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(result))

    return result(bits), codegen


def exp(x: Any) -> Any:
    """e ** x for a float32 or float64 scalar, in kernels (see the module docstring)."""
    return np.exp(x)


# float32: ln 2 = LN2_HI + LN2_LO, LN2_HI with few bits (n * LN2_HI is exact)
F32_LOG2E = np.float32(1.44269504088896341)
F32_LN2_HI = np.float32(0.693359375)
F32_LN2_LO = np.float32(-2.12194440e-4)
F32_RANGE = (np.float32(-104.0), np.float32(89.0))  # exp rounds to 0 below, to inf above
F32_POLY = tuple(np.float32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))
# float64
F64_LOG2E = np.float64(1.4426950408889634)
F64_LN2_HI = np.float64(6.93145751953125e-1)
F64_LN2_LO = np.float64(1.42860682030941723212e-6)
F64_RANGE = (np.float64(-746.0), np.float64(710.0))
F64_INVERSE_FACTORIALS = tuple(np.float64(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64)))
                               for k in range(13, 1, -1))  # 1/13! ... 1/2!


@overload(exp)
def _exp_overload(x: Any) -> Any:
    if x == types.float32:
        c0, c1, c2, c3, c4, c5 = F32_POLY
        low, high = F32_RANGE

        def exp_float32(x: Any) -> Any:
            one, half = np.float32(1.0), np.float32(0.5)
            clamped = min(max(x, low), high)
            n = np.floor(clamped * F32_LOG2E + half)
            r = (clamped - n * F32_LN2_HI) - n * F32_LN2_LO
            p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
            y = (p * (r * r) + r) + one
            first = np.int64(n) >> 1  # 2^n as 2^first * 2^(n - first): both normal
            scale_first = float_from_bits(np.int32((first + 127) << 23))
            scale_rest = float_from_bits(np.int32((np.int64(n) - first + 127) << 23))
            value = (y * scale_first) * scale_rest
            return x if x != x else value

        return exp_float32
    if x == types.float64:
        inverse = F64_INVERSE_FACTORIALS
        low, high = F64_RANGE

        def exp_float64(x: Any) -> Any:
            one, half = np.float64(1.0), np.float64(0.5)
            clamped = min(max(x, low), high)
            n = np.floor(clamped * F64_LOG2E + half)
            r = (clamped - n * F64_LN2_HI) - n * F64_LN2_LO
            p = inverse[0]
            for k in range(1, len(inverse)):
                p = p * r + inverse[k]
            y = (p * (r * r) + r) + one
            first = np.int64(n) >> 1
            scale_first = float_from_bits((first + 1023) << 52)
            scale_rest = float_from_bits((np.int64(n) - first + 1023) << 52)
            value = (y * scale_first) * scale_rest
            return x if x != x else value

        return exp_float64
    return None
