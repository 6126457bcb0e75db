"""Numba CPU kernels of the Bernstein polynomial law (``fastflow::bernstein``): forward, inverse
and the fused backward of both, one element per iteration, parallel over chunks.

The maths and the derivation of the gradients are the reference's
(``kernels/reference/bernstein.py``): per element, the softmax of its raw values gives the
steps ``Delta`` between the increasing coefficients, and the degree ``M``, ``M - 1`` and ``M - 2``
Bernstein bases at ``t`` give ``f``, ``f'``, ``f''`` and every gradient in ``O(M)``. The inverse
is a Newton iteration kept inside a shrinking bracket (a bisection step whenever Newton would
leave it) to the float64 resolution, clamped to ``[eps, 1 - eps]`` as the reference's
bisection is. Everything is computed in float64 and stored in the inputs' dtype.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from fastflow.kernels.numba._threads import launch
from fastflow.kernels.reference.bernstein import EPS

_CHUNK = 256  # elements per parallel task
_NJIT = dict(fastmath={"contract", "arcp"}, error_model="numpy")  # no nnan/ninf: NaN propagates


@nb.njit(inline="always", **_NJIT)
def _steps(raw, r, n, bound, s, delta, theta):
    """Row ``r``'s softmax ``s``, steps ``Delta`` (``M = n + 4``) and coefficients ``theta``
    (``M + 1``); returns the softmax's scale ``c = 2B - 4d``."""
    m = n + 4
    mx = -math.inf
    for j in range(n):
        mx = max(mx, np.float64(raw[r, j]))
    tot = 0.0
    for j in range(n):
        e = math.exp(np.float64(raw[r, j]) - mx)
        s[j] = e
        tot += e
    d = 2.0 * bound / m
    c = 2.0 * bound - 4.0 * d
    for j in range(n):
        s[j] /= tot
        delta[2 + j] = c * s[j]
    delta[0] = d
    delta[1] = d
    delta[m - 2] = d
    delta[m - 1] = d
    theta[0] = -bound
    for i in range(m):
        theta[i + 1] = theta[i] + delta[i]
    return c


@nb.njit(inline="always", **_NJIT)
def _powers(t, m, pt, pu):
    """``pt[i] = t^i``, ``pu[i] = (1 - t)^i`` for ``i <= m``."""
    u = 1.0 - t
    pt[0] = 1.0
    pu[0] = 1.0
    for i in range(1, m + 1):
        pt[i] = pt[i - 1] * t
        pu[i] = pu[i - 1] * u


@nb.njit(inline="always", **_NJIT)
def _f_fp(m, binom, delta, theta, pt, pu):
    """``f(t)`` and ``f'(t)`` from the powers of ``t`` (``binom[k]``: the row of degree ``m - k``)."""
    f = 0.0
    for i in range(m + 1):
        f += binom[0, i] * pt[i] * pu[m - i] * theta[i]
    fp = 0.0
    for i in range(m):
        fp += binom[1, i] * pt[i] * pu[m - 1 - i] * delta[i]
    return f, m * fp


@nb.njit(inline="always", **_NJIT)
def _fpp(m, binom, delta, pt, pu):
    fpp = 0.0
    for i in range(m - 1):
        fpp += binom[2, i] * pt[i] * pu[m - 2 - i] * (delta[i + 1] - delta[i])
    return m * (m - 1) * fpp


@nb.njit(inline="always", **_NJIT)
def _root(y, m, binom, delta, theta, pt, pu, eps):
    """``t`` in ``[eps, 1 - eps]`` with ``f(t) = y``: safeguarded Newton (bisection steps keep it
    in the bracket) to the float64 resolution; clamped to the bracket's ends."""
    lo = eps
    hi = 1.0 - eps
    t = min(max(0.5 * (y + theta[m]) / theta[m], lo), hi)  # theta[m] = B: the identity's guess
    for _ in range(200):
        _powers(t, m, pt, pu)
        f, fp = _f_fp(m, binom, delta, theta, pt, pu)
        r = f - y
        if r == 0.0:
            return t
        if r < 0.0:
            lo = t
        else:
            hi = t
        tn = t - r / fp
        if not (lo < tn < hi):
            tn = 0.5 * (lo + hi)
        if abs(tn - t) <= 4e-16 * max(t, 1e-3) or hi - lo <= 4e-16:
            return tn
        t = tn
    return t


@nb.njit(**_NJIT, cache=True)
def _scratch(m):
    return (np.empty(m, np.float64), np.empty(m, np.float64), np.empty(m + 1, np.float64),
            np.empty(m + 1, np.float64), np.empty(m + 1, np.float64))


@nb.njit(parallel=True, **_NJIT, cache=True)
def _fwd_kernel(z, raw, inverse, bound, binom, eps, out, lad):
    nel = z.shape[0]
    n = raw.shape[1]
    m = n + 4
    log2b = math.log(2.0 * bound)
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        s, delta, theta, pt, pu = _scratch(m)
        for e in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK)):
            v = np.float64(z[e])
            _steps(raw, e, n, bound, s, delta, theta)
            if inverse:
                if v <= -bound:
                    out[e] = ((v + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
                    lad[e] = 0.0
                elif v >= bound:
                    out[e] = ((v - bound) / (2.0 * bound) - eps + 1) * 2.0 * bound - bound
                    lad[e] = 0.0
                elif v != v:
                    out[e] = v
                    lad[e] = v
                else:
                    t = _root(v, m, binom, delta, theta, pt, pu, eps)
                    _powers(t, m, pt, pu)
                    f, fp = _f_fp(m, binom, delta, theta, pt, pu)
                    out[e] = t * 2.0 * bound - bound
                    lad[e] = log2b - math.log(fp)
            else:
                t = (v + bound) / (2.0 * bound)
                if t <= eps:
                    out[e] = 2.0 * bound * (t - eps) - bound
                    lad[e] = 0.0
                elif t >= 1.0 - eps:
                    out[e] = 2.0 * bound * (t - 1.0 + eps) + bound
                    lad[e] = 0.0
                else:  # (a NaN too: it propagates)
                    _powers(t, m, pt, pu)
                    f, fp = _f_fp(m, binom, delta, theta, pt, pu)
                    out[e] = f
                    lad[e] = math.log(fp) - log2b


@nb.njit(parallel=True, **_NJIT, cache=True)
def _bwd_kernel(g_out, g_lad, z, raw, inverse, bound, binom, eps, g_z, g_raw):
    nel = z.shape[0]
    n = raw.shape[1]
    m = n + 4
    for ch in nb.prange((nel + _CHUNK - 1) // _CHUNK):
        s, delta, theta, pt, pu = _scratch(m)
        gs = np.empty(n, np.float64)
        for e in range(ch * _CHUNK, min(nel, (ch + 1) * _CHUNK)):
            v = np.float64(z[e])
            go = np.float64(g_out[e])
            gl = np.float64(g_lad[e])
            c = _steps(raw, e, n, bound, s, delta, theta)
            if inverse:
                inside = -bound < v < bound
                t = _root(v, m, binom, delta, theta, pt, pu, eps) if inside else 0.5
            else:
                t = (v + bound) / (2.0 * bound)
                inside = eps < t < 1.0 - eps
            if not inside:  # linear with slope 1 outside: the raw values have no say
                g_z[e] = go
                for j in range(n):
                    g_raw[e, j] = 0.0
                continue
            _powers(t, m, pt, pu)
            _, fp = _f_fp(m, binom, delta, theta, pt, pu)
            fpp = _fpp(m, binom, delta, pt, pu)
            # tail[i] = sum_(k >= i) b^M_k: dy/dDelta_i is tail[i + 1], accumulated from the top
            tail = 0.0
            for i in range(m, 2 + n, -1):
                tail += binom[0, i] * pt[i] * pu[m - i]
            dot = 0.0
            for j in range(n - 1, -1, -1):
                i = 2 + j
                dy = tail + binom[0, i + 1] * pt[i + 1] * pu[m - i - 1]  # sum_(k > i) b^M_k
                tail = dy
                dlad = m * binom[1, i] * pt[i] * pu[m - 1 - i] / fp
                if inverse:
                    dt = -dy / fp
                    g = go * 2.0 * bound * dt - gl * (dlad + fpp / fp * dt)
                else:
                    g = go * dy + gl * dlad
                gs[j] = c * g
                dot += gs[j] * s[j]
            for j in range(n):
                g_raw[e, j] = s[j] * (gs[j] - dot)
            if inverse:
                g_z[e] = go * 2.0 * bound / fp - gl * fpp / (fp * fp)
            else:
                g_z[e] = go * fp / (2.0 * bound) + gl * fpp / (fp * 2.0 * bound)


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


def _rows(t, k=0):
    a = (t.detach() if t.requires_grad else t).numpy()
    a = a.reshape(-1, k) if k else a.reshape(-1)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


# The launcher interface of kernels/<backend>/bernstein.py (see kernels/reference/bernstein.py).

def forward(x, raw, inverse, bound):
    z, r = _rows(x), _rows(raw, raw.shape[-1])
    out = np.empty_like(z)
    lad = np.empty_like(z)
    if z.shape[0]:
        launch(_fwd_kernel, _tasks(z.shape[0]), z, r, bool(inverse), float(bound), _binoms(r.shape[1] + 4), EPS,
               out, lad)
    return torch.from_numpy(out.reshape(x.shape)), torch.from_numpy(lad.reshape(x.shape))


def backward(g_out, g_lad, x, raw, inverse, bound):
    z, r = _rows(x), _rows(raw, raw.shape[-1])
    g_z = np.empty_like(z)
    g_r = np.empty_like(r)
    if z.shape[0]:
        launch(_bwd_kernel, _tasks(z.shape[0]), _rows(g_out), _rows(g_lad), z, r, bool(inverse), float(bound),
               _binoms(r.shape[1] + 4), EPS, g_z, g_r)
    return torch.from_numpy(g_z.reshape(x.shape)), torch.from_numpy(g_r.reshape(raw.shape))
