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

from collections import namedtuple
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def float_from_bits(typingctx: Any, bits: Any, like: Any) -> Any:
    """The float of ``like``'s type whose bit pattern is ``bits`` (an int64; its low 32 bits
    for a float32)."""
    if bits != types.int64 or like not in (types.float32, types.float64):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        result = context.get_value_type(like)
        pattern = args[0] if like == types.float64 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(pattern, result)

    return like(bits, like), codegen


def exp(x: Any) -> Any:
    """e ** x for a float32 or float64 scalar, in kernels (see the module docstring)."""
    return np.exp(x)


#: per dtype: log2(e); ln 2 = ln2_hi + ln2_lo with ln2_hi of few bits (n * ln2_hi is exact);
#: the range outside which exp rounds to 0 or inf; the polynomial p(r) with
#: exp(r) = 1 + r + r^2 p(r), highest coefficient first; the exponent field's bias and shift
ExpConstants = namedtuple(
    "ExpConstants", "log2e ln2_hi ln2_lo low high polynomial exponent_bias mantissa_bits")

EXP_CONSTANTS = {
    types.float32: ExpConstants(
        np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4),
        np.float32(-104.0), np.float32(89.0),
        tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                      4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)),
        127, 23),
    types.float64: ExpConstants(
        np.float64(1.4426950408889634), np.float64(6.93145751953125e-1),
        np.float64(1.42860682030941723212e-6), np.float64(-746.0), np.float64(710.0),
        tuple(np.float64(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64)))
              for k in range(13, 1, -1)),  # Taylor: 1/13! ... 1/2!
        1023, 52),
}


@overload(exp)
def _exp_overload(x: Any) -> Any:
    if x not in EXP_CONSTANTS:
        return None
    log2e, ln2_hi, ln2_lo, low, high, polynomial, bias, shift = EXP_CONSTANTS[x]
    one, half = polynomial[0].dtype.type(1.0), polynomial[0].dtype.type(0.5)

    def exp_impl(x: Any) -> Any:
        clamped = min(max(x, low), high)
        n = np.floor(clamped * log2e + half)
        r = (clamped - n * ln2_hi) - n * ln2_lo
        p = polynomial[0]
        for k in range(1, len(polynomial)):
            p = p * r + polynomial[k]
        y = (p * (r * r) + r) + one
        first = np.int64(n) >> 1  # 2^n as 2^first * 2^(n - first): both normal numbers
        scale_first = float_from_bits((first + bias) << shift, x)
        scale_rest = float_from_bits((np.int64(n) - first + bias) << shift, x)
        value = (y * scale_first) * scale_rest
        return x if x != x else value

    return exp_impl
