"""Numba CPU kernels of the sum-of-squares polynomial law (``fastflow::sos_polynomial``): forward,
inverse and the fused backward of both, one element per iteration, parallel over chunks.

The maths is the reference's (``kernels/reference/sos.py``), per element in ``O(K L^2)``: with
``s = x / B`` and ``a'`` the coefficients with ``p_k``'s constant 1 added,

    f = slope x + (B / K) sum_k sum_(i,j) a'_i a'_j s^(i+j+1) / (i+j+1),   g = f' = slope + mean_k p_k(s)^2,
    df/da_(k,j) = (2B / K) sum_i a'_i s^(i+j+1) / (i+j+1),   d log g / da_(k,j) = 2 p_k(s) s^j / (K g),
    g' = 2 mean_k p_k(s) p_k'(s) / B,

and the inverse's from the implicit function (``dx/dy = 1/g``). The inverse grows a bracket from
``[-B, B]`` by doubling, then runs Newton kept inside it (bisection where it would leave it) to
the float64 resolution. Everything is computed in float64 and stored in the inputs' dtype.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from fastflow.kernels.numba._math import log as _log
from fastflow.kernels.numba._bridge import rows
from fastflow.kernels.numba._threads import launch

_CHUNK = 1024  # elements per parallel task
_NJIT = dict(fastmath={"contract", "arcp"}, error_model="numpy")  # no nnan/ninf: NaN propagates


@nb.njit(inline="always", **_NJIT)
def _f_g(x, a, e, kk, n1, bound, slope, pw):
    """``f(x)``, ``g(x)`` and ``g'(x)`` of element ``e`` (``a (N, K * (L + 1))``; ``pw`` scratch
    for the powers of ``s`` up to ``2L + 1``)."""
    s = x / bound
    pw[0] = 1.0
    for m in range(1, 2 * n1):
        pw[m] = pw[m - 1] * s
    f = 0.0
    g = 0.0
    dg = 0.0
    for k in range(kk):
        base = k * n1
        p = 0.0
        dp = 0.0
        for i in range(n1):
            ai = np.float64(a[e, base + i]) + (1.0 if i == 0 else 0.0)
            p += ai * pw[i]
            if i > 0:
                dp += i * ai * pw[i - 1]
            for j in range(n1):
                aj = np.float64(a[e, base + j]) + (1.0 if j == 0 else 0.0)
                f += ai * aj * pw[i + j + 1] / (i + j + 1)
        g += p * p
        dg += p * dp
    return slope * x + bound * f / kk, slope + g / kk, 2.0 * dg / (kk * bound)


@nb.njit(inline="always", **_NJIT)
def _root(y, a, e, kk, n1, bound, slope, pw):
    """``x`` with ``f(x) = y``: a bracket grown from ``[-B, B]`` by doubling, then Newton kept in
    it (bisection where it would leave it) to the float64 resolution."""
    lo = -bound
    hi = bound
    for _ in range(2200):  # (f(x) = y has a root: f increases with slope >= slope, down to -inf)
        if _f_g(lo, a, e, kk, n1, bound, slope, pw)[0] > y:  # (f increases: then f(hi) > y too)
            hi = lo
            lo *= 2.0
        elif _f_g(hi, a, e, kk, n1, bound, slope, pw)[0] < y:
            lo = hi
            hi *= 2.0
        else:
            break
    x = min(max(y, lo), hi)
    for _ in range(200):
        f, g, _ = _f_g(x, a, e, kk, n1, bound, slope, pw)
        r = f - y
        step = r / g
        if abs(step) <= 4e-16 * max(abs(x), 1e-3) or r == 0.0:
            return x - step
        if r < 0.0:
            lo = x
        else:
            hi = x
        xn = x - step
        if not (lo < xn < hi):
            xn = 0.5 * (lo + hi)
        if hi - lo <= 4e-16 * max(abs(lo), abs(hi), 1e-3):
            return xn
        x = xn
    return x


@nb.njit(parallel=True, **_NJIT, cache=True)
def _fwd_kernel(z, a, kk, inverse, bound, slope, out, lad):
    nel = z.shape[0]
    n1 = a.shape[1] // kk
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        pw = np.empty(2 * n1 + 1)
        for e in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK)):
            v = np.float64(z[e])
            if v != v:
                out[e] = v
                lad[e] = v
                continue
            if inverse:
                x = _root(v, a, e, kk, n1, bound, slope, pw)
                _, g, _ = _f_g(x, a, e, kk, n1, bound, slope, pw)
                out[e] = x
                lad[e] = -_log(g)
            else:
                f, g, _ = _f_g(v, a, e, kk, n1, bound, slope, pw)
                out[e] = f
                lad[e] = _log(g)


@nb.njit(parallel=True, **_NJIT, cache=True)
def _bwd_kernel(g_out, g_lad, z, a, kk, inverse, bound, slope, g_z, g_a):
    nel = z.shape[0]
    n1 = a.shape[1] // kk
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        pw = np.empty(2 * n1 + 1)
        for e in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK)):
            v = np.float64(z[e])
            go = np.float64(g_out[e])
            gl = np.float64(g_lad[e])
            x = _root(v, a, e, kk, n1, bound, slope, pw) if inverse and v == v else v
            _, g, dg = _f_g(x, a, e, kk, n1, bound, slope, pw)  # (pw: the powers of x / B)
            if inverse:
                g_z[e] = go / g - gl * dg / (g * g)
            else:
                g_z[e] = go * g + gl * dg / g
            for k in range(kk):
                base = k * n1
                p = 0.0
                for i in range(n1):
                    p += (np.float64(a[e, base + i]) + (1.0 if i == 0 else 0.0)) * pw[i]
                for j in range(n1):
                    dy = 0.0
                    for i in range(n1):
                        ai = np.float64(a[e, base + i]) + (1.0 if i == 0 else 0.0)
                        dy += ai * pw[i + j + 1] / (i + j + 1)
                    dy *= 2.0 * bound / kk
                    dlad = 2.0 * p * pw[j] / (kk * g)
                    if inverse:
                        dx = -dy / g
                        g_a[e, base + j] = go * dx - gl * (dlad + dg / g * dx)
                    else:
                        g_a[e, base + j] = go * dy + gl * dlad


def _tasks(n: int) -> int:
    return (n + _CHUNK - 1) // _CHUNK


# The launcher interface of kernels/<backend>/sos.py (see kernels/reference/sos.py).

def forward(x, a, inverse, bound, slope):
    kk, n1 = a.shape[-2], a.shape[-1]
    z, r = rows(x), rows(a, kk * n1)
    out = np.empty_like(z)
    lad = np.empty_like(z)
    if z.shape[0]:
        launch(_fwd_kernel, _tasks(z.shape[0]), z, r, kk, bool(inverse), float(bound), float(slope), out, lad)
    return torch.from_numpy(out.reshape(x.shape)), torch.from_numpy(lad.reshape(x.shape))


def backward(g_out, g_lad, x, a, inverse, bound, slope):
    kk, n1 = a.shape[-2], a.shape[-1]
    z, r = rows(x), rows(a, kk * n1)
    g_z = np.empty_like(z)
    g_a = np.empty_like(r)
    if z.shape[0]:
        launch(_bwd_kernel, _tasks(z.shape[0]), rows(g_out), rows(g_lad), z, r, kk, bool(inverse), float(bound),
               float(slope), g_z, g_a)
    return torch.from_numpy(g_z.reshape(x.shape)), torch.from_numpy(g_a.reshape(a.shape))
