"""Numba CPU kernels for the affine/additive coupling laws and NICE's scaling layer.

Every tensor arrives as a 3-D ``(B, M, N)`` strided view (a channel half of an image, an
interleaved column of a conditioner's output): the launchers turn each into its 1-D base buffer
plus element strides, so nothing is copied. A parallel task takes a block of rows; per row and
``m`` each input's ``N`` run is used in place when its stride is 1 and gathered into a small
scratch row otherwise, so the arithmetic loops always see contiguous rows and vectorise.
Arithmetic is float64 whatever the storage dtype (float32/float64); no reassociation, so the
per-sample log-det sums (four fixed partial sums) are bitwise reproducible.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numpy.lib.stride_tricks import as_strided

from fastflow.kernels.numba._math import exp as _exp

# Elements per parallel task (rows are never split): enough to amortise scheduling, small
# enough to balance two to a few dozen threads.
_CHUNK_ELEMS = 8192

_FASTMATH = {"contract", "arcp"}  # no nnan/ninf (NaN and inf propagate), no reassoc (reproducible)

@nb.njit(inline="always", fastmath=_FASTMATH)
def _tanh(a):
    """tanh via one exp (vectorises); absolute error ~1e-16, which is what log s needs."""
    e = _exp(-2.0 * abs(a))
    r = (1.0 - e) / (1.0 + e)
    return r if a >= 0 else -r


# (log s, s, 1/s, d log s / dh) of a raw scale h (float64), one function per parameterisation.


@nb.njit(inline="always", fastmath=_FASTMATH)
def _terms_exp(h, clamp):
    return h, _exp(h), _exp(-h), 1.0


@nb.njit(inline="always", fastmath=_FASTMATH)
def _terms_softclamp(h, clamp):
    u = _tanh(h / clamp)
    logs = clamp * u
    return logs, _exp(logs), _exp(-logs), 1.0 - u * u


@nb.njit(inline="always", fastmath=_FASTMATH)
def _terms_sigmoid(h, clamp):
    z = h + 2.0
    e = _exp(-abs(z))
    d = 1.0 + e
    if z >= 0:
        return -math.log1p(e), 1.0 / d, d, e / d
    return z - math.log1p(e), e / d, 1.0 + _exp(-z), 1.0 / d


@nb.njit(inline="always")
def _row(buf, st, b, m, n, scratch):
    """The ``n`` elements at [b, m, :] of a strided view as (array, offset): the buffer itself
    when the run has unit stride, else the run gathered into ``scratch``. Offsets are unsigned:
    numba wraps negative signed indices around, and that select stops LLVM vectorising."""
    o = np.uint64(b * st[0] + m * st[1])
    sn = np.uint64(st[2])
    if sn == 1:
        return buf, o
    for j in range(n):
        scratch[j] = buf[o + np.uint64(j) * sn]
    return scratch, np.uint64(0)


@nb.njit(inline="always", fastmath={"contract"})
def _sum4(v, o, n):
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    n4 = n - (n & 3)
    for j in range(0, n4, 4):
        k = o + np.uint64(j)
        a0 += np.float64(v[k])
        a1 += np.float64(v[k + np.uint64(1)])
        a2 += np.float64(v[k + np.uint64(2)])
        a3 += np.float64(v[k + np.uint64(3)])
    for j in range(n4, n):
        a0 += np.float64(v[o + np.uint64(j)])
    return (a0 + a1) + (a2 + a3)


@nb.njit(inline="always", fastmath=_FASTMATH)
def _terms(h, clamp, kind):
    if kind == 0:
        return _terms_exp(h, clamp)
    if kind == 1:
        return _terms_softclamp(h, clamp)
    return _terms_sigmoid(h, clamp)


@nb.njit(inline="always", fastmath=_FASTMATH)
def _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, n_, clamp, inverse, kind):
    """One contiguous run of the forward; returns its sum of log s. Called with a constant
    ``kind`` so that, once inlined, each call site holds one law only."""
    if inverse:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = _terms(np.float64(hr[ho + k]), clamp, kind)
            out[o + k] = (np.float64(xr[xo + k]) - np.float64(tr[to + k])) * inv_s
            lg[j] = logs
    else:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = _terms(np.float64(hr[ho + k]), clamp, kind)
            out[o + k] = np.float64(xr[xo + k]) * s + np.float64(tr[to + k])
            lg[j] = logs
    # exp: log s is h itself, summed straight from the input row.
    return _sum4(hr, ho, n_) if kind == 0 else _sum4(lg, np.uint64(0), n_)


@nb.njit(inline="always", fastmath=_FASTMATH)
def _bwd_run(gr, g0, xr, xo, tr, to, hr, ho, gx, gh, o, g, n_, clamp, inverse, kind):
    if inverse:
        # out = (y - t)/s is recomputed: d out/dh = -out (log s)'.
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = _terms(np.float64(hr[ho + k]), clamp, kind)
            gv = np.float64(gr[g0 + k])
            xi = (np.float64(xr[xo + k]) - np.float64(tr[to + k])) * inv_s
            gx[o + k] = gv * inv_s
            gh[o + k] = -(gv * xi + g) * d
    else:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = _terms(np.float64(hr[ho + k]), clamp, kind)
            gv = np.float64(gr[g0 + k])
            gx[o + k] = gv * s
            gh[o + k] = (gv * np.float64(xr[xo + k]) * s + g) * d


@nb.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _affine_fwd_kernel(x, xs, t, ts, h, hs, shape, rows, kind, clamp, inverse, out, lad):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        sx = np.empty(n_, x.dtype)
        st = np.empty(n_, x.dtype)
        sh = np.empty(n_, x.dtype)
        lg = np.empty(n_, np.float64)
        for b in range(c * rows, min(nb_, (c + 1) * rows)):
            acc = 0.0
            for m in range(m_):
                xr, xo = _row(x, xs, b, m, n_, sx)
                tr, to = _row(t, ts, b, m, n_, st)
                hr, ho = _row(h, hs, b, m, n_, sh)
                o = np.uint64((b * m_ + m) * n_)
                if kind == 0:
                    acc += _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, n_, clamp, inverse, 0)
                elif kind == 1:
                    acc += _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, n_, clamp, inverse, 1)
                else:
                    acc += _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, n_, clamp, inverse, 2)
            lad[b] = -acc if inverse else acc


@nb.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _affine_bwd_kernel(go, gos, gl, gls, x, xs, t, ts, h, hs, shape, rows, kind, clamp, inverse, gx, gh):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        sg = np.empty(n_, x.dtype)
        sx = np.empty(n_, x.dtype)
        sh = np.empty(n_, x.dtype)
        st = np.empty(n_, x.dtype)
        for b in range(c * rows, min(nb_, (c + 1) * rows)):
            g = np.float64(gl[b * gls[0]])
            for m in range(m_):
                gr, g0 = _row(go, gos, b, m, n_, sg)
                xr, xo = _row(x, xs, b, m, n_, sx)
                hr, ho = _row(h, hs, b, m, n_, sh)
                tr, to = _row(t, ts, b, m, n_, st) if inverse else (sx, np.uint64(0))
                o = np.uint64((b * m_ + m) * n_)
                if kind == 0:
                    _bwd_run(gr, g0, xr, xo, tr, to, hr, ho, gx, gh, o, g, n_, clamp, inverse, 0)
                elif kind == 1:
                    _bwd_run(gr, g0, xr, xo, tr, to, hr, ho, gx, gh, o, g, n_, clamp, inverse, 1)
                else:
                    _bwd_run(gr, g0, xr, xo, tr, to, hr, ho, gx, gh, o, g, n_, clamp, inverse, 2)


_KINDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}


@nb.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _additive_fwd_kernel(x, xs, t, ts, shape, rows, inverse, out):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        sx = np.empty(n_, x.dtype)
        st = np.empty(n_, x.dtype)
        for b in range(c * rows, min(nb_, (c + 1) * rows)):
            for m in range(m_):
                xr, xo = _row(x, xs, b, m, n_, sx)
                tr, to = _row(t, ts, b, m, n_, st)
                o = np.uint64((b * m_ + m) * n_)
                if inverse:
                    for j in range(n_):
                        k = np.uint64(j)
                        out[o + k] = xr[xo + k] - tr[to + k]
                else:
                    for j in range(n_):
                        k = np.uint64(j)
                        out[o + k] = xr[xo + k] + tr[to + k]


@nb.njit(fastmath={"contract"}, cache=True)
def _rescale_prep_kernel(ls, lss, m_, n_, sign, e):
    """e[m*N + n] = exp(sign * log_scale[m, n]); returns sum(log_scale) in a fixed order."""
    acc = 0.0
    for m in range(m_):
        for j in range(n_):
            v = np.float64(ls[m * lss[1] + j * lss[2]])
            e[m * n_ + j] = _exp(sign * v)
            acc += v
    return acc


@nb.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rescale_fwd_kernel(x, xs, e, shape, rows, out):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        sx = np.empty(n_, x.dtype)
        for b in range(c * rows, min(nb_, (c + 1) * rows)):
            for m in range(m_):
                xr, xo = _row(x, xs, b, m, n_, sx)
                eo = np.uint64(m * n_)
                o = np.uint64((b * m_ + m) * n_)
                for j in range(n_):
                    k = np.uint64(j)
                    out[o + k] = np.float64(xr[xo + k]) * e[eo + k]


@nb.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rescale_bwd_kernel(go, gos, x, xs, e, shape, rows, gx, partial):
    """gx = go * e; partial[c, f] = sum over chunk c's rows of go * x * e (the output's gradient
    contribution to log_scale, before the sign); chunks are fixed by the shape, so the final
    sum over chunks is reproducible."""
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        sg = np.empty(n_, x.dtype)
        sx = np.empty(n_, x.dtype)
        for b in range(c * rows, min(nb_, (c + 1) * rows)):
            for m in range(m_):
                gr, g0 = _row(go, gos, b, m, n_, sg)
                xr, xo = _row(x, xs, b, m, n_, sx)
                eo = np.uint64(m * n_)
                o = np.uint64((b * m_ + m) * n_)
                for j in range(n_):
                    k = np.uint64(j)
                    gv = np.float64(gr[g0 + k])
                    ev = e[eo + k]
                    gx[o + k] = gv * ev
                    partial[c, eo + k] += gv * np.float64(xr[xo + k]) * ev


@nb.njit(fastmath={"contract"}, cache=True)
def _reduce_partials(partial, gl, gls, nb_, sign, out):
    gsum = 0.0
    for b in range(nb_):
        gsum += np.float64(gl[b * gls[0]])
    nc, f = partial.shape
    for j in range(f):
        acc = 0.0
        for c in range(nc):
            acc += partial[c, j]
        out[j] = sign * (acc + gsum)


# --------------------------------------------------------------------------------------------
# Launchers: numpy arrays in (any non-negative strides, no copies), contiguous arrays out.
# --------------------------------------------------------------------------------------------


def _base(a: np.ndarray):
    """The 1-D buffer spanning a strided array (from its first element) and its element strides."""
    item = a.itemsize
    strides = [s // item for s in a.strides]
    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, strides)) if a.size else 0
    buf = as_strided(a, shape=(span,), strides=(item,))
    if a.ndim == 1:
        strides = [strides[0], 0, 0]
    return buf, np.array(strides, dtype=np.int64)


def _rows(shape) -> int:
    f = max(1, shape[1] * shape[2])
    return max(1, min(shape[0], _CHUNK_ELEMS // f))


def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    """``x, shift, raw_scale (B, M, N)`` strided arrays of one dtype -> ``(out (B, M, N), lad (B,))``."""
    shape = np.array(x.shape, dtype=np.int64)
    out = np.empty(x.shape, x.dtype)
    lad = np.empty(x.shape[0], x.dtype)
    if x.size:
        _affine_fwd_kernel(*_base(x), *_base(shift), *_base(raw_scale), shape, _rows(x.shape), _KINDS[scale],
                           float(clamp), bool(inverse), out.reshape(-1), lad)
    else:
        lad[:] = 0
    return out, lad


def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    """Fused backward: ``(grad x, grad raw_scale)``, contiguous ``(B, M, N)``."""
    shape = np.array(x.shape, dtype=np.int64)
    gx = np.empty(x.shape, x.dtype)
    gh = np.empty(x.shape, x.dtype)
    if x.size:
        _affine_bwd_kernel(*_base(g_out), *_base(g_lad), *_base(x), *_base(shift), *_base(raw_scale), shape,
                           _rows(x.shape), _KINDS[scale], float(clamp), bool(inverse), gx.reshape(-1), gh.reshape(-1))
    return gx, gh


def additive_fwd(x, shift, inverse):
    shape = np.array(x.shape, dtype=np.int64)
    out = np.empty(x.shape, x.dtype)
    if x.size:
        _additive_fwd_kernel(*_base(x), *_base(shift), shape, _rows(x.shape), bool(inverse), out.reshape(-1))
    return out


def _rescale_prep(log_scale, inverse):
    m_, n_ = log_scale.shape
    e = np.empty(m_ * n_, np.float64)
    buf, st = _base(log_scale[None])
    total = _rescale_prep_kernel(buf, st, m_, n_, -1.0 if inverse else 1.0, e) if e.size else 0.0
    return e, total


def rescale_fwd(x, log_scale, inverse):
    """``x (B, M, N)``, ``log_scale (M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    e, total = _rescale_prep(log_scale, inverse)
    out = np.empty(x.shape, x.dtype)
    if x.size:
        _rescale_fwd_kernel(*_base(x), e, np.array(x.shape, dtype=np.int64), _rows(x.shape), out.reshape(-1))
    lad = np.full(x.shape[0], -total if inverse else total, dtype=x.dtype)
    return out, lad


def rescale_bwd(g_out, g_lad, x, log_scale, inverse):
    """``(grad x (B, M, N), grad log_scale (M, N))``."""
    e, _ = _rescale_prep(log_scale, inverse)
    gx = np.empty(x.shape, x.dtype)
    g_ls = np.empty(log_scale.shape, x.dtype)
    rows = _rows(x.shape)
    nchunks = (x.shape[0] + rows - 1) // rows
    partial = np.zeros((nchunks, e.size), np.float64)
    if x.size:
        _rescale_bwd_kernel(*_base(g_out), *_base(x), e, np.array(x.shape, dtype=np.int64), rows, gx.reshape(-1), partial)
    if g_ls.size:
        _reduce_partials(partial, *_base(g_lad), x.shape[0], -1.0 if inverse else 1.0, g_ls.reshape(-1))
    return gx, g_ls
