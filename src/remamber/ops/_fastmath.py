"""Vectorisable exp, softplus and sigmoid for the numba kernels.

libm's scalar exp stops LLVM from vectorising a loop (numba has no SVML here), and exp is the bulk of
the scan's arithmetic. `vexp` is exp for float32 as a branch-free polynomial (Cody-Waite range
reduction, degree-7 Taylor on |r| <= ln2/2, exponent built by a bitcast), about 2 ulp, that LLVM
vectorises; results below exp(-87) (where float32 turns denormal) are flushed to 0. For float64 it is
math.exp unchanged (tests and fp64 callers keep libm accuracy).

`vsoftplus(x)` = x for x > 20 (torch's threshold), else max(x, 0) + log1p(exp(-|x|)) with log1p on
(0, 1] as 2*atanh(y / (2 + y)) (odd series to s^15, |s| <= 1/3: no cancellation for small y).
`vsigmoid(x)` = 1 / (1 + exp(-x)).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload

__all__ = ["vexp", "vsoftplus", "vsigmoid", "vsoftplus_sigmoid"]

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # ln 2 split so k * _LN2_HI is exact for |k| < 2^9
_LN2_LO = _F(-2.12194440e-4)
_X_MIN = _F(-87.0)
_X_MAX = _F(88.0)
_HALF = _F(0.5)
_ONE = _F(1.0)
_ZERO = _F(0.0)
_C2, _C3, _C4, _C5, _C6, _C7 = (_F(1.0 / math.factorial(i)) for i in range(2, 8))


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def vexp(x):
    """exp(x); compiled by numba through the overload below."""
    return math.exp(x)


@overload(vexp, inline="always")
def _vexp_overload(x):
    if x == types.float32:

        def exp_f32(x):
            xc = min(max(x, _X_MIN), _X_MAX)
            k = np.floor(xc * _LOG2E + _HALF)
            r = xc - k * _LN2_HI - k * _LN2_LO
            p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
            scale = _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))
            return p * scale if x >= _X_MIN else _ZERO

        return exp_f32
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


def vsoftplus(x):
    """softplus(x) with threshold 20; compiled by numba through the overload below."""
    return x if x > 20.0 else math.log1p(math.exp(x))


def vsigmoid(x):
    """1 / (1 + exp(-x)); compiled by numba through the overload below."""
    return 1.0 / (1.0 + math.exp(-x))


_TWENTY = _F(20.0)
_TWO = _F(2.0)
# 2 * atanh(s) = 2 * (s + s^3/3 + ... + s^15/15)
_S3, _S5, _S7, _S9, _S11, _S13, _S15 = (_F(1.0 / k) for k in (3, 5, 7, 9, 11, 13, 15))


@overload(vsoftplus, inline="always")
def _vsoftplus_overload(x):
    if x == types.float32:

        def softplus_f32(x):
            y = vexp(-abs(x))  # in (0, 1]
            s = y / (_TWO + y)
            s2 = s * s
            series = _ONE + s2 * (_S3 + s2 * (_S5 + s2 * (_S7 + s2 * (_S9 + s2 * (_S11 + s2 * (_S13 + s2 * _S15))))))
            sp = max(x, _ZERO) + _TWO * s * series
            return x if x > _TWENTY else sp

        return softplus_f32
    if isinstance(x, types.Float):
        return lambda x: x if x > 20.0 else math.log1p(math.exp(x))
    return None


@overload(vsigmoid, inline="always")
def _vsigmoid_overload(x):
    if x == types.float32:
        return lambda x: _ONE / (_ONE + vexp(-x))
    if isinstance(x, types.Float):
        return lambda x: 1.0 / (1.0 + math.exp(-x))
    return None


def vsoftplus_sigmoid(x):
    """(softplus(x), sigmoid(x)) sharing one exp; compiled by numba through the overload below."""
    return vsoftplus(x), vsigmoid(x)


@overload(vsoftplus_sigmoid, inline="always")
def _vsoftplus_sigmoid_overload(x):
    if x == types.float32:

        def softplus_sigmoid_f32(x):
            y = vexp(-abs(x))  # in (0, 1]
            s = y / (_TWO + y)
            s2 = s * s
            series = _ONE + s2 * (_S3 + s2 * (_S5 + s2 * (_S7 + s2 * (_S9 + s2 * (_S11 + s2 * (_S13 + s2 * _S15))))))
            sp = max(x, _ZERO) + _TWO * s * series
            inv = _ONE / (_ONE + y)
            return (x if x > _TWENTY else sp), (inv if x >= _ZERO else y * inv)

        return softplus_sigmoid_f32
    if isinstance(x, types.Float):
        return lambda x: (x if x > 20.0 else math.log1p(math.exp(x)), 1.0 / (1.0 + math.exp(-x)))
    return None
