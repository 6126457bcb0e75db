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
def log1p_unit(e):
    """log1p(e) for e in [0, 1] to ~1 ulp, without a libm call (which cost ~45 cycles here).

    log1p(e) = 2 atanh(e / (2 + e)), and for e > sqrt2-1 = ln2 + 2 atanh((e - 1) / (e + 3));
    either way |u| <= 0.1716, where ten odd terms of the atanh series leave < 1e-17.
    """
    hi = e > _SQRT2_M1
    u = (e - 1.0) / (e + 3.0) if hi else e / (2.0 + e)
    w = u * u
    w2 = w * w
    w4 = w2 * w2
    # Estrin's scheme over the eleven coefficients 1/(2i+1): depth 4 instead of 10.
    b0 = (1.0 + w * (1.0 / 3.0)) + (1.0 / 5.0 + w * (1.0 / 7.0)) * w2
    b1 = (1.0 / 9.0 + w * (1.0 / 11.0)) + (1.0 / 13.0 + w * (1.0 / 15.0)) * w2
    b2 = (1.0 / 17.0 + w * (1.0 / 19.0)) + (1.0 / 21.0) * w2
    p = (b0 + b1 * w4) + b2 * (w4 * w4)
    return 2.0 * u * p + (_LN2 if hi else 0.0)
