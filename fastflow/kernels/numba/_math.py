"""Elementary functions for the Numba kernels, written out so that LLVM can inline and
vectorise them (libm's exp/log1p are opaque scalar calls, ~3x slower here).

Numba's on-disk cache keys a kernel on its own source file only: after editing this module,
delete the ``__pycache__/*.nbi|*.nbc`` files next to the kernels that inline it.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# exp(x) = 2^(n/32) * exp(r): a 32-entry table of 2^(j/32) and a short polynomial on
# |r| <= ln2/64, so that the loops vectorise (libm's exp is a scalar call).
_EXP_TABLE = np.array([2.0 ** (j / 32.0) for j in range(32)], dtype=np.float64)
_INV_LN2_32 = 32.0 / math.log(2.0)
_LN2_32_HI = 6.93147180369123816490e-01 / 32.0
_LN2_32_LO = 1.90821492927058770002e-10 / 32.0


@nb.njit(inline="always", fastmath={"contract"})
def exp(x):
    """exp(x), relative error < 1e-15; overflows to inf above ~709.78, underflows (through the
    subnormals) to 0 below ~-745, NaN gives NaN. The power of two is applied as two factors so
    that both stay normal numbers over the whole clamped range."""
    xc = min(max(x, -1100.0), 1100.0)
    n = math.floor(xc * _INV_LN2_32 + 0.5)
    r = (xc - n * _LN2_32_HI) - n * _LN2_32_LO
    # Estrin's scheme: dependency depth 3 instead of Horner's 6 (scalar callers are
    # latency-bound).
    r2 = r * r
    p = ((1.0 + r) + (0.5 + r * (1.0 / 6.0)) * r2) + ((1.0 / 24.0 + r * (1.0 / 120.0)) + (1.0 / 720.0) * r2) * (r2 * r2)
    ni = np.int64(n)
    k = ni >> 5
    k1 = k >> 1
    k2 = k - k1
    y = p * _EXP_TABLE[ni & 31]
    y = y * np.int64((np.int64(1023) + k1) << 52).view(np.float64)
    y = y * np.int64((np.int64(1023) + k2) << 52).view(np.float64)
    return y if x == x else x


_LN2 = math.log(2.0)
_SQRT2_M1 = math.sqrt(2.0) - 1.0


@nb.njit(inline="always", fastmath={"contract"})
def _two_atanh(u):
    """2 atanh(u) for |u| <= 0.1716: eleven odd terms of the series leave < 1e-17."""
    w = u * u
    w2 = w * w
    w4 = w2 * w2
    # Estrin's scheme over the eleven coefficients 1/(2i+1): depth 4 instead of 10.
    b0 = (1.0 + w * (1.0 / 3.0)) + (1.0 / 5.0 + w * (1.0 / 7.0)) * w2
    b1 = (1.0 / 9.0 + w * (1.0 / 11.0)) + (1.0 / 13.0 + w * (1.0 / 15.0)) * w2
    b2 = (1.0 / 17.0 + w * (1.0 / 19.0)) + (1.0 / 21.0) * w2
    p = (b0 + b1 * w4) + b2 * (w4 * w4)
    return 2.0 * u * p


@nb.njit(inline="always", fastmath={"contract"})
def log1p_unit(e):
    """log1p(e) for e in [0, 1] to ~1 ulp, without a libm call (which cost ~45 cycles here).

    log1p(e) = 2 atanh(e / (2 + e)), and for e > sqrt2-1 = ln2 + 2 atanh((e - 1) / (e + 3));
    either way |u| <= 0.1716.
    """
    hi = e > _SQRT2_M1
    u = (e - 1.0) / (e + 3.0) if hi else e / (2.0 + e)
    return _two_atanh(u) + (_LN2 if hi else 0.0)


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SQRT_HALF_BITS = np.int64(0x3FE6A09E667F3BCD)  # the float64 bit pattern of sqrt(1/2)
_TWO_54 = 18014398509481984.0


@nb.njit(inline="always", fastmath={"contract"})
def log(x):
    """Natural log to ~1 ulp (max relative error 5e-16 measured), vectorisable: x = 2^k m with
    m in [sqrt(1/2), sqrt(2)) taken from the bits, log m = 2 atanh((m-1)/(m+1)) by the same
    series as ``log1p_unit``. Subnormals are rescaled first; log(0) = -inf, log(x<0) = NaN,
    log(inf) = inf, NaN gives NaN. Callers must compile with ``error_model="numpy"`` for the
    division to vectorise (Numba's default model guards it with a Python exception branch).
    """
    sub = x < 2.2250738585072014e-308
    xs = x * _TWO_54 if sub else x
    bits = np.float64(xs).view(np.int64)
    kk = (bits - _SQRT_HALF_BITS) >> 52
    m = np.int64(bits - (kk << 52)).view(np.float64)
    u = (m - 1.0) / (m + 1.0)
    kf = np.float64(kk) - (54.0 if sub else 0.0)
    r = kf * _LN2_HI + (kf * _LN2_LO + _two_atanh(u))
    r = r if x < np.inf else x
    return r if x > 0.0 else (-np.inf if x == 0.0 else np.nan)


# ---------------------------------------------------------------- float32 lanes
# For kernels whose float32 results need no more than float32 arithmetic (the coupling laws,
# as PyTorch computes them): twice the SIMD lanes of float64 and shorter polynomials. Every
# constant is a np.float32 so that Numba keeps the arithmetic in float32 (a Python float
# literal would promote it to float64).

_F32 = np.float32
_ONE32 = _F32(1.0)
_LOG2E32 = _F32(1.4426950408889634)
_LN2_HI32 = _F32(0.693145751953125)  # 12 significant bits: n * _LN2_HI32 is exact
_LN2_LO32 = _F32(1.4286067653301870e-06)
_ROUND32 = _F32(12582912.0)  # 1.5 * 2^23: adding it rounds a float32 to an integer
_ROUND32_BITS = np.int32(0x4B400000)
_E2, _E3, _E4, _E5, _E6, _E7 = (_F32(1.0 / math.factorial(i)) for i in range(2, 8))


@nb.njit(inline="always", fastmath={"contract"})
def _exp32_parts(xc):
    """``(p, n)`` with ``exp(xc) = p * 2^n``: n = round(xc / ln 2), and a degree-7 polynomial on
    the reduced argument |r| <= ln2/2."""
    kf = xc * _LOG2E32 + _ROUND32
    n = kf - _ROUND32
    ni = np.float32(kf).view(np.int32) - _ROUND32_BITS
    r = (xc - n * _LN2_HI32) - n * _LN2_LO32
    r2 = r * r
    p = (_ONE32 + r) + r2 * ((_E2 + r * _E3) + r2 * ((_E4 + r * _E5) + r2 * (_E6 + r * _E7)))
    return p, ni


@nb.njit(inline="always", fastmath={"contract"})
def exp32(x):
    """exp of a float32 in float32 arithmetic, max relative error 1.2e-7 (~1 ulp) measured;
    overflows to inf above ~88.72, underflows through the subnormals to 0, NaN gives NaN."""
    p, ni = _exp32_parts(min(max(x, _F32(-104.0)), _F32(89.0)))
    # 2^n as two factors, so that both stay normal floats down to the subnormal results
    k1 = ni >> np.int32(1)
    k2 = ni - k1
    y = p * np.int32((np.int32(127) + k1) << np.int32(23)).view(np.float32)
    y = y * np.int32((np.int32(127) + k2) << np.int32(23)).view(np.float32)
    return y if x == x else x


_EXP32_BOUND = _F32(87.0)


@nb.njit(inline="always", fastmath={"contract"})
def exp32_bounded(x):
    """``exp32`` for arguments known to lie in [-87, 87]: the same bits there, from one
    power-of-two factor instead of two (the result is a normal float, so either scaling is
    exact); arguments outside are clamped to the bounds (never inf, never subnormal); NaN gives
    NaN. ~20% off a softclamp coupling's float32 forward loop (two of these per element)."""
    p, ni = _exp32_parts(min(max(x, -_EXP32_BOUND), _EXP32_BOUND))
    y = p * np.int32((np.int32(127) + ni) << np.int32(23)).view(np.float32)
    return y if x == x else x


_SQRT2_M1_32 = _F32(_SQRT2_M1)
_LN2_32 = _F32(_LN2)


@nb.njit(inline="always", fastmath={"contract"})
def log1p_unit32(e):
    """float32 log1p(e) for e in [0, 1] (as ``log1p_unit``, five series terms), < 2 ulp."""
    hi = e > _SQRT2_M1_32
    u = (e - _ONE32) / (e + _F32(3.0)) if hi else e / (_F32(2.0) + e)
    w = u * u
    p = (_ONE32 + w * _F32(1.0 / 3.0)) + (w * w) * ((_F32(1.0 / 5.0) + w * _F32(1.0 / 7.0)) + (w * w) * _F32(1.0 / 9.0))
    return _F32(2.0) * u * p + (_LN2_32 if hi else _F32(0.0))
