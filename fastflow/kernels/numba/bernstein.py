"""Numba CPU kernels of the Bernstein polynomial law (``fastflow::bernstein``): forward, inverse
and the fused backward of both, one element per iteration, parallel over chunks.

The maths and the derivation of the gradients are the reference's
(``kernels/reference/bernstein.py``): per element, the softmax of its raw values gives the
steps ``Delta`` between the increasing coefficients, and the degree ``M``, ``M - 1`` and ``M - 2``
Bernstein bases at ``t`` give ``f``, ``f'``, ``f''`` and every gradient in ``O(M)``. A tile of
64 elements is evaluated together, the loops over the coefficients running across the tile so
that LLVM vectorises them. The inverse is a Newton iteration kept inside a shrinking bracket (a
bisection step whenever Newton would leave it) to the float64 resolution, clamped to ``[eps,
1 - eps]`` as the reference's bisection is. Everything is computed in float64 and stored in the
inputs' dtype.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from fastflow.kernels.numba._math import exp as _exp
from fastflow.kernels.numba._math import log as _log
from fastflow.kernels.numba._bridge import rows
from fastflow.kernels.numba._threads import launch
from fastflow.kernels.reference.bernstein import EPS

_CHUNK = 1024  # elements per parallel task
_TILE = 64  # elements evaluated together: the loops over the coefficients run across a tile (SIMD)
_NJIT = dict(fastmath={"contract", "arcp"}, error_model="numpy")  # no nnan/ninf: NaN propagates
_NEWTON_STEPS = 100  # a bound only: Newton converges in a handful, bisection in ~52


@nb.njit(inline="always", **_NJIT)
def _load(z, raw, i0, nel, n, bound, eps, inverse, v, tt, R):
    """The tile's inputs ``v``, their polynomial coordinates ``tt`` (0.5 outside, where the map
    is linear) and raw values ``R[j, t]`` (the last element repeated past the end)."""
    for t in range(_TILE):
        e = min(i0 + t, nel - 1)
        x = np.float64(z[e])
        v[t] = x
        for j in range(n):
            R[j, t] = np.float64(raw[e, j])
        if inverse:
            tt[t] = 0.5 * (x + bound) / bound if -bound < x < bound else 0.5
        else:
            u = (x + bound) / (2.0 * bound)
            tt[t] = u if eps < u < 1.0 - eps else 0.5


@nb.njit(inline="always", **_NJIT)
def _steps(R, n, bound, mx, tot, D, TH):
    """Per element of the tile: the softmax of ``R`` (in place), the ``M = n + 4`` steps ``D``
    and the coefficients ``TH``; returns the softmax's scale ``c = 2B - 4d``."""
    m = n + 4
    d = 2.0 * bound / m
    c = 2.0 * bound - 4.0 * d
    for t in range(_TILE):
        mx[t] = R[0, t]
        tot[t] = 0.0
    for j in range(1, n):
        for t in range(_TILE):
            mx[t] = max(mx[t], R[j, t])
    for j in range(n):
        for t in range(_TILE):
            ex = _exp(R[j, t] - mx[t])
            R[j, t] = ex
            tot[t] += ex
    for t in range(_TILE):
        tot[t] = 1.0 / tot[t]
    for j in range(n):
        for t in range(_TILE):
            R[j, t] *= tot[t]
            D[2 + j, t] = c * R[j, t]
    for t in range(_TILE):
        D[0, t] = d
        D[1, t] = d
        D[m - 2, t] = d
        D[m - 1, t] = d
        TH[0, t] = -bound
    for i in range(m):
        for t in range(_TILE):
            TH[i + 1, t] = TH[i, t] + D[i, t]
    return c


@nb.njit(inline="always", **_NJIT)
def _powers(tt, m, PT, PU):
    """``PT[i, t] = tt^i``, ``PU[i, t] = (1 - tt)^i`` for ``i <= m``."""
    for t in range(_TILE):
        PT[0, t] = 1.0
        PU[0, t] = 1.0
    for i in range(1, m + 1):
        for t in range(_TILE):
            PT[i, t] = PT[i - 1, t] * tt[t]
            PU[i, t] = PU[i - 1, t] * (1.0 - tt[t])


@nb.njit(inline="always", **_NJIT)
def _f_fp(m, binom, D, TH, PT, PU, f, fp):
    """``f`` and ``f'`` at the tile's ``tt`` (``binom[k]``: the binomials of degree ``m - k``)."""
    for t in range(_TILE):
        f[t] = 0.0
        fp[t] = 0.0
    for i in range(m + 1):
        b = binom[0, i]
        for t in range(_TILE):
            f[t] += b * PT[i, t] * PU[m - i, t] * TH[i, t]
    for i in range(m):
        b = binom[1, i] * m
        for t in range(_TILE):
            fp[t] += b * PT[i, t] * PU[m - 1 - i, t] * D[i, t]


@nb.njit(inline="always", **_NJIT)
def _solve(v, m, binom, D, TH, PT, PU, f, fp, tt, lo, hi, done, bound, eps):
    """The inverse's ``tt`` with ``f(tt) = v`` inside ``(-B, B)``, in ``[eps, 1 - eps]``:
    Newton kept in a shrinking bracket (bisection where it would leave it), for the whole tile
    at once until every element has converged to the float64 resolution."""
    for t in range(_TILE):
        lo[t] = eps
        hi[t] = 1.0 - eps
        # a float flag: with a bool array the compiled kernel read wrong flags (not chased)
        done[t] = 0.0 if -bound < v[t] < bound else 1.0
        tt[t] = min(max(tt[t], eps), 1.0 - eps)
    for _ in range(_NEWTON_STEPS):
        _powers(tt, m, PT, PU)
        _f_fp(m, binom, D, TH, PT, PU, f, fp)
        left = 0
        for t in range(_TILE):
            if done[t] != 0.0:
                continue
            r = f[t] - v[t]
            step = r / fp[t]
            if abs(step) <= 4e-16 * max(tt[t], 1e-3):  # Newton's own step: converged
                done[t] = 1.0
                tt[t] -= step
                continue
            if r < 0.0:
                lo[t] = tt[t]
            else:
                hi[t] = tt[t]
            tn = tt[t] - step
            if not (lo[t] < tn < hi[t]):
                tn = 0.5 * (lo[t] + hi[t])
            if hi[t] - lo[t] <= 4e-16:
                done[t] = 1.0
            else:
                left += 1
            tt[t] = tn
        if left == 0:
            break
    for t in range(_TILE):
        if not (-bound < v[t] < bound):
            tt[t] = 0.5


@nb.njit(inline="always", **_NJIT)
def _scratch(n, m):
    """A task's scratch, one allocation per row set: rows of one array would share a base
    pointer, and LLVM then keeps the tile loops scalar (measured 2.4x slower)."""
    T = _TILE
    return (np.empty((max(n, 1), T)), np.empty((m, T)), np.empty((m + 1, T)), np.empty((m + 1, T)),
            np.empty((m + 1, T)), np.empty(T), np.empty(T), np.empty(T), np.empty(T), np.empty(T), np.empty(T),
            np.empty(T), np.empty(T), np.empty(T), np.empty(T))


@nb.njit(parallel=True, **_NJIT, cache=True)
def _fwd_kernel(z, raw, inverse, bound, binom, eps, out, lad):
    nel = z.shape[0]
    n = raw.shape[1]
    m = n + 4
    log2b = math.log(2.0 * bound)
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        R, D, TH, PT, PU, v, tt, mx, tot, f, fp, lo, hi, done, _ = _scratch(n, m)
        for i0 in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK), _TILE):
            _load(z, raw, i0, nel, n, bound, eps, inverse, v, tt, R)
            _steps(R, n, bound, mx, tot, D, TH)
            if inverse:
                _solve(v, m, binom, D, TH, PT, PU, f, fp, tt, lo, hi, done, bound, eps)
            _powers(tt, m, PT, PU)
            _f_fp(m, binom, D, TH, PT, PU, f, fp)
            for t in range(min(_TILE, nel - i0)):
                x = v[t]
                e = i0 + t
                if inverse:
                    if x <= -bound:
                        out[e] = ((x + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
                        lad[e] = 0.0
                    elif x >= bound:
                        out[e] = ((x - bound) / (2.0 * bound) - eps + 1) * 2.0 * bound - bound
                        lad[e] = 0.0
                    elif x != x:
                        out[e] = x
                        lad[e] = x
                    else:
                        out[e] = tt[t] * 2.0 * bound - bound
                        lad[e] = log2b - _log(fp[t])
                else:
                    u = (x + bound) / (2.0 * bound)
                    if u <= eps:
                        out[e] = 2.0 * bound * (u - eps) - bound
                        lad[e] = 0.0
                    elif u >= 1.0 - eps:
                        out[e] = 2.0 * bound * (u - 1.0 + eps) + bound
                        lad[e] = 0.0
                    elif u != u:
                        out[e] = u
                        lad[e] = u
                    else:
                        out[e] = f[t]
                        lad[e] = _log(fp[t]) - log2b


@nb.njit(parallel=True, **_NJIT, cache=True)
def _bwd_kernel(g_out, g_lad, z, raw, inverse, bound, binom, eps, g_z, g_raw):
    nel = z.shape[0]
    n = raw.shape[1]
    m = n + 4
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        R, D, TH, PT, PU, v, tt, mx, tot, f, fp, lo, hi, done, fpp = _scratch(n, m)
        G = np.empty((max(n, 1), _TILE))
        tail = np.empty(_TILE)
        dot = np.empty(_TILE)
        go = np.empty(_TILE)
        gl = np.empty(_TILE)
        for i0 in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK), _TILE):
            _load(z, raw, i0, nel, n, bound, eps, inverse, v, tt, R)
            c = _steps(R, n, bound, mx, tot, D, TH)
            if inverse:
                _solve(v, m, binom, D, TH, PT, PU, f, fp, tt, lo, hi, done, bound, eps)
            _powers(tt, m, PT, PU)
            _f_fp(m, binom, D, TH, PT, PU, f, fp)
            for t in range(_TILE):
                e = min(i0 + t, nel - 1)
                go[t] = np.float64(g_out[e])
                gl[t] = np.float64(g_lad[e])
                fpp[t] = 0.0
                tail[t] = 0.0
                dot[t] = 0.0
            for i in range(m - 1):
                b = binom[2, i] * m * (m - 1)
                for t in range(_TILE):
                    fpp[t] += b * PT[i, t] * PU[m - 2 - i, t] * (D[i + 1, t] - D[i, t])
            for i in range(m, 2 + n, -1):  # tail = sum_(k > n + 2) b^M_k
                b = binom[0, i]
                for t in range(_TILE):
                    tail[t] += b * PT[i, t] * PU[m - i, t]
            for j in range(n - 1, -1, -1):
                i = 2 + j
                b0 = binom[0, i + 1]
                b1 = binom[1, i] * m
                for t in range(_TILE):
                    dy = tail[t] + b0 * PT[i + 1, t] * PU[m - i - 1, t]  # dy/dDelta_i = sum_(k > i) b^M_k
                    tail[t] = dy
                    dlad = b1 * PT[i, t] * PU[m - 1 - i, t] / fp[t]
                    if inverse:
                        dt = -dy / fp[t]
                        g = go[t] * 2.0 * bound * dt - gl[t] * (dlad + fpp[t] / fp[t] * dt)
                    else:
                        g = go[t] * dy + gl[t] * dlad
                    G[j, t] = c * g
                    dot[t] += c * g * R[j, t]
            for t in range(min(_TILE, nel - i0)):
                e = i0 + t
                x = v[t]
                inside = -bound < x < bound if inverse else eps < (x + bound) / (2.0 * bound) < 1.0 - eps
                if not inside:  # linear with slope 1 outside: the raw values have no say
                    g_z[e] = go[t]
                    for j in range(n):
                        g_raw[e, j] = 0.0
                    continue
                for j in range(n):
                    g_raw[e, j] = R[j, t] * (G[j, t] - dot[t])
                if inverse:
                    g_z[e] = go[t] * 2.0 * bound / fp[t] - gl[t] * fpp[t] / (fp[t] * fp[t])
                else:
                    g_z[e] = go[t] * fp[t] / (2.0 * bound) + gl[t] * fpp[t] / (fp[t] * 2.0 * bound)


_BINOMS: dict = {}


def _binoms(m: int) -> np.ndarray:
    """``(3, m + 1)``: the binomial coefficients of degrees ``m``, ``m - 1`` and ``m - 2``."""
    b = _BINOMS.get(m)
    if b is None:
        b = np.zeros((3, m + 1), np.float64)
        for k in range(3):
            for i in range(m - k + 1):
                b[k, i] = float(math.comb(m - k, i))
        _BINOMS[m] = b
    return b


def _tasks(n: int) -> int:
    return (n + _CHUNK - 1) // _CHUNK


# The launcher interface of kernels/<backend>/bernstein.py (see kernels/reference/bernstein.py).

def forward(x, raw, inverse, bound):
    z, r = rows(x), rows(raw, raw.shape[-1])
    out = np.empty_like(z)
    lad = np.empty_like(z)
    if z.shape[0]:
        launch(_fwd_kernel, _tasks(z.shape[0]), z, r, bool(inverse), float(bound), _binoms(r.shape[1] + 4), EPS,
               out, lad)
    return torch.from_numpy(out.reshape(x.shape)), torch.from_numpy(lad.reshape(x.shape))


def backward(g_out, g_lad, x, raw, inverse, bound):
    z, r = rows(x), rows(raw, raw.shape[-1])
    g_z = np.empty_like(z)
    g_r = np.empty_like(r)
    if z.shape[0]:
        launch(_bwd_kernel, _tasks(z.shape[0]), rows(g_out), rows(g_lad), z, r, bool(inverse), float(bound),
               _binoms(r.shape[1] + 4), EPS, g_z, g_r)
    return torch.from_numpy(g_z.reshape(x.shape)), torch.from_numpy(g_r.reshape(raw.shape))
