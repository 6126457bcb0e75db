"""Numba CPU kernels for the affine/additive coupling laws and NICE's scaling layer.

Every tensor arrives as a 3-D ``(B, M, N)`` strided view (a channel half of an image, an
interleaved column of a conditioner's output): the launchers turn each into its 1-D base buffer
plus element strides, so nothing is copied. A parallel task takes a block of rows, and each
input's rows as one contiguous run: the buffer itself when the view is C-contiguous, else
gathered into task scratch, so the arithmetic loops always see contiguous data and vectorise.
The affine kernels run float32 storage in float32 arithmetic (as PyTorch does),
float64 in float64; the log-det sums are float64. No reassociation, so the
per-sample log-det sums (eight fixed partial sums) are bitwise reproducible.
"""

from __future__ import annotations

import functools
import math
import types as pytypes

import numba as nb
import numpy as np
import torch

from fastflow.kernels.numba._compile import slp
from fastflow.kernels.numba._simd import sum8_runs4
from fastflow.kernels.numba._threads import launch
from fastflow.kernels.numba._math import exp as _exp
from fastflow.kernels.numba._math import exp32 as _exp32
from fastflow.kernels.numba._math import exp32_bounded as _exp32b
from fastflow.kernels.numba._math import log1p_unit32 as _log1p32

# Elements per parallel task (rows are never split): enough to amortise a task's scratch
# allocations and set-up (8192 was 1.2x slower at B=65536, D=64, two threads), small enough
# for a task's blocks to stay in L2 and to balance a few dozen threads.
_CHUNK_ELEMS = 32768

_FASTMATH = {"contract", "arcp"}  # no nnan/ninf (NaN and inf propagate), no reassoc (reproducible)
# IEEE division instead of Numba's Python error model, whose ZeroDivisionError branch on every
# division keeps LLVM from vectorising the softclamp and sigmoid loops.
_NJIT = dict(fastmath=_FASTMATH, error_model="numpy")

@nb.njit(inline="always", **_NJIT)
def _tanh(a):
    """tanh via one exp (vectorises); absolute error ~1e-16, which is what log s needs."""
    e = _exp(-2.0 * abs(a))
    r = (1.0 - e) / (1.0 + e)
    return r if a >= 0 else -r


# (log s, s, 1/s, d log s / dh) of a raw scale h (float64), one function per parameterisation.


@nb.njit(inline="always", **_NJIT)
def _terms_exp(h, clamp):
    return h, _exp(h), _exp(-h), 1.0


@nb.njit(inline="always", **_NJIT)
def _terms_softclamp(h, clamp):
    u = _tanh(h / clamp)
    logs = clamp * u
    return logs, _exp(logs), _exp(-logs), 1.0 - u * u


@nb.njit(inline="always", **_NJIT)
def _terms_sigmoid(h, clamp):
    z = h + 2.0
    e = _exp(-abs(z))
    d = 1.0 + e
    if z >= 0:
        return -math.log1p(e), 1.0 / d, d, e / d
    return z - math.log1p(e), e / d, 1.0 + _exp(-z), 1.0 / d


# The same laws in float32 arithmetic, for float32 storage: what PyTorch computes, at twice the
# SIMD width and with shorter polynomials (2.6x faster per element than the float64 path).
_ONE32 = np.float32(1.0)
_TWO32 = np.float32(2.0)


@nb.njit(inline="always", **_NJIT)
def _tanh32(a):
    # e <= 1; past -87 it is clamped to e^-87 (~1.6e-38) instead of going subnormal, and
    # (1 - e)/(1 + e) rounds to 1 either way: the same bits as with exp32.
    e = _exp32b(-_TWO32 * abs(a))
    r = (_ONE32 - e) / (_ONE32 + e)
    return r if a >= 0 else -r


@nb.njit(inline="always", **_NJIT)
def _terms_exp32(h, clamp):
    return h, _exp32(h), _exp32(-h), _ONE32


@nb.njit(inline="always", **_NJIT)
def _terms_softclamp32(h, clamp):
    u = _tanh32(h / clamp)
    logs = clamp * u
    # |log s| <= clamp <= SOFTCLAMP32_MAX (larger clamps take the float64 arithmetic, see
    # _arithmetic): exp32_bounded's range, where its bits are exp32's.
    return logs, _exp32b(logs), _exp32b(-logs), _ONE32 - u * u


@nb.njit(inline="always", **_NJIT)
def _terms_sigmoid32(h, clamp):
    z = h + _TWO32
    e = _exp32(-abs(z))
    d = _ONE32 + e
    if z >= 0:
        return -_log1p32(e), _ONE32 / d, d, e / d
    return z - _log1p32(e), e / d, _ONE32 + _exp32(-z), _ONE32 / d


@nb.njit(inline="always", fastmath={"contract"})
def _sum8(v, o, n):
    """sum(v[o:o+n]) in float64 over eight fixed partial sums (one SIMD register, so the order
    and hence the bits do not depend on the machine)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    n8 = n - (n & 7)
    for j in range(0, n8, 8):
        k = o + np.uint64(j)
        a0 += np.float64(v[k])
        a1 += np.float64(v[k + np.uint64(1)])
        a2 += np.float64(v[k + np.uint64(2)])
        a3 += np.float64(v[k + np.uint64(3)])
        a4 += np.float64(v[k + np.uint64(4)])
        a5 += np.float64(v[k + np.uint64(5)])
        a6 += np.float64(v[k + np.uint64(6)])
        a7 += np.float64(v[k + np.uint64(7)])
    for j in range(n8, n):
        a0 += np.float64(v[o + np.uint64(j)])
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@nb.njit(inline="always")
def _run_sums(v, o, n, q, rs):
    """rs[i] = _sum8(v, o + i*n, n) for the ``q`` back-to-back runs of ``n`` from ``o``: four
    at a time in explicit SIMD (bitwise the same sums; see ``_simd``), the rest one by one."""
    i = 0
    un = np.uint64(n)
    while i + 4 <= q:
        rs[i], rs[i + 1], rs[i + 2], rs[i + 3] = sum8_runs4(v, o + np.uint64(i * n), n, un)
        i += 4
    while i < q:
        rs[i] = _sum8(v, o + np.uint64(i * n), n)
        i += 1


@nb.njit(inline="always", **_NJIT)
def _terms(h, clamp, kind):
    if kind == 0:
        return _terms_exp(h, clamp)
    if kind == 1:
        return _terms_softclamp(h, clamp)
    return _terms_sigmoid(h, clamp)


@nb.njit(inline="always", **_NJIT)
def _terms32(h, clamp, kind):
    if kind == 0:
        return _terms_exp32(h, clamp)
    if kind == 1:
        return _terms_softclamp32(h, clamp)
    return _terms_sigmoid32(h, clamp)


@nb.njit(inline="always")
def _as64(v):
    return np.float64(v)


@nb.njit(inline="always")
def _as32(v):
    return np.float32(v)


# The affine kernels below are written once against the globals _LAW and _CV and compiled
# twice (see _arithmetic_clone): float64 arithmetic for float64 storage, float32 arithmetic
# (what PyTorch computes; 2.6x the throughput) for float32 storage. Each compilation sees one
# arithmetic only, so compile time stays that of one.
_LAW = _terms
_CV = _as64


@nb.njit(inline="always", **_NJIT)
def _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, n_, clamp, inverse, kind, law, cv):
    """One contiguous run of the forward in the arithmetic of ``law`` (``_terms`` or ``_terms32``)
    with loads converted by ``cv`` (``_as64``/``_as32``) and ``clamp`` of that type; log s goes
    to ``lg`` (the exp law's log s is h itself: callers sum h). Called with a constant
    ``kind`` so that, once inlined, each call site holds one law only."""
    if inverse:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = law(cv(hr[ho + k]), clamp, kind)
            out[o + k] = (cv(xr[xo + k]) - cv(tr[to + k])) * inv_s
            if kind != 0:
                lg[j] = logs
    else:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = law(cv(hr[ho + k]), clamp, kind)
            out[o + k] = cv(xr[xo + k]) * s + cv(tr[to + k])
            if kind != 0:
                lg[j] = logs


@nb.njit(inline="always", **_NJIT)
def _bwd_run(gr, g0, xr, xo, tr, to, hr, ho, gx, gh, o, g, n_, clamp, inverse, kind, law, cv, gconst):
    """One contiguous run of the backward within one row (``g``: that row's log-det gradient).
    With ``gconst`` (a literal at each call site) the output gradient is the one value
    ``gr[g0]`` (a gradient expanded from a scalar, as ``y.sum()`` gives), read once."""
    gc = cv(gr[g0])
    if inverse:
        # out = (y - t)/s is recomputed: d out/dh = -out (log s)'.
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = law(cv(hr[ho + k]), clamp, kind)
            gv = gc if gconst else cv(gr[g0 + k])
            xi = (cv(xr[xo + k]) - cv(tr[to + k])) * inv_s
            gx[o + k] = gv * inv_s
            gh[o + k] = -(gv * xi + g) * d
    else:
        for j in range(n_):
            k = np.uint64(j)
            logs, s, inv_s, d = law(cv(hr[ho + k]), clamp, kind)
            gv = gc if gconst else cv(gr[g0 + k])
            gx[o + k] = gv * s
            gh[o + k] = (gv * cv(xr[xo + k]) * s + g) * d


@nb.njit(inline="always")
def _gather(buf, o, u, cnt, scratch):
    """scratch[:cnt] = buf[o :: u]: loops with a constant stride for the common strides (1:
    rows of a channel half; 2: interleaved shift/scale columns), which LLVM vectorises."""
    if u == 1:
        for i in range(cnt):
            scratch[i] = buf[o + np.uint64(i)]
    elif u == 2:
        for i in range(cnt):
            scratch[i] = buf[o + np.uint64(2 * i)]
    else:
        su = np.uint64(u)
        for i in range(cnt):
            scratch[i] = buf[o + np.uint64(i) * su]


@nb.njit(inline="always")
def _block(buf, st, b0, nrows, m_, n_, scratch):
    """Rows ``b0 : b0+nrows`` of a strided (B, M, N) view as one contiguous run (array,
    offset): the buffer itself when the view is C-contiguous, else gathered into ``scratch``
    (so the arithmetic always runs as one long vectorised loop per task, whatever the layout;
    per-row loops of ~64 elements cost as much in set-up as in arithmetic). A view whose
    elements are equally spaced (interleaved columns ``h[:, ::2]``) is gathered as one run."""
    f = m_ * n_
    u = st[2] if n_ > 1 else (st[1] if m_ > 1 else st[0])
    if (n_ == 1 or st[2] == u) and (m_ == 1 or st[1] == n_ * u) and (nrows == 1 or st[0] == f * u):
        if u == 1:
            return buf, np.uint64(b0 * st[0])
        _gather(buf, np.uint64(b0 * st[0]), u, nrows * f, scratch)
        return scratch, np.uint64(0)
    i = 0
    for b in range(b0, b0 + nrows):
        for m in range(m_):
            _gather(buf, np.uint64(b * st[0] + m * st[1]), st[2], n_, scratch[i:])
            i += n_
    return scratch, np.uint64(0)


_LOW32 = np.uint64(0xFFFFFFFF)
_HIGH = np.uint64(32)


@nb.njit(inline="always")
def _split_pairs(pair, o, cnt, st, sh, i):
    """st[i+k], sh[i+k] = the low and high float32 of pair[o+k] (k < cnt): contiguous 64-bit
    loads split in registers, which vectorises where a stride-2 float32 gather does not."""
    for k in range(cnt):
        v = pair[o + np.uint64(k)]
        st[i + k] = np.uint32(v & _LOW32).view(np.float32)
        sh[i + k] = np.uint32(v >> _HIGH).view(np.float32)


@nb.njit(inline="always")
def _block_pairs(pair, ps, b0, nrows, m_, n_, st, sh):
    """Shift and raw scale interleaved in one buffer (``params[..., 0]``, ``params[..., 1]``),
    read as 64-bit pairs (``ps``: the pair view's strides) and split into the two scratch
    blocks. Returns the (array, offset) runs of both."""
    f = m_ * n_
    u = ps[2] if n_ > 1 else (ps[1] if m_ > 1 else ps[0])
    if u == 1 and (m_ == 1 or ps[1] == n_) and (nrows == 1 or ps[0] == f):
        _split_pairs(pair, np.uint64(b0 * ps[0]), nrows * f, st, sh, 0)
    else:
        i = 0
        for b in range(b0, b0 + nrows):
            for m in range(m_):
                o = np.uint64(b * ps[0] + m * ps[1])
                if ps[2] == 1:
                    _split_pairs(pair, o, n_, st, sh, i)
                else:
                    for j in range(n_):
                        _split_pairs(pair, o + np.uint64(j * ps[2]), 1, st, sh, i + j)
                i += n_
    return st, np.uint64(0), sh, np.uint64(0)


@nb.njit(inline="always")
def _task_blocks(x, xs, t, ts, h, hs, pair, ps, b0, nrows, m_, n_, need_t):
    """The (array, offset) runs of ``x``, ``t`` and ``h`` for rows ``b0 .. b0+nrows`` of one
    task, gathered into fresh scratch where a layout needs it (shift and raw scale read as
    64-bit pairs when ``pair`` holds them). Without ``need_t`` the shift is not read (its run
    is then a placeholder)."""
    cnt = nrows * m_ * n_
    sx = np.empty(cnt, x.dtype)
    st = np.empty(cnt, x.dtype)
    sh = np.empty(cnt, x.dtype)
    xr, xo = _block(x, xs, b0, nrows, m_, n_, sx)
    if pair.size:
        tr, to, hr, ho = _block_pairs(pair, ps, b0, nrows, m_, n_, st, sh)
    else:
        hr, ho = _block(h, hs, b0, nrows, m_, n_, sh)
        tr, to = _block(t, ts, b0, nrows, m_, n_, st) if need_t else (sx, np.uint64(0))
    return xr, xo, tr, to, hr, ho


@slp
@nb.njit(parallel=True, **_NJIT, cache=True)
def _affine_fwd_kernel(x, xs, t, ts, h, hs, pair, ps, shape, rows, kind, clamp, inverse, out, lad):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    f = m_ * n_
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        b0 = c * rows
        nr = min(nb_, b0 + rows) - b0
        cnt = nr * f
        # log s in the arithmetic's own type (float32 in the float32 clone): the sums below widen
        # each term to float64 anyway, so the bits are those of a float64 scratch, and a
        # one-width loop vectorises better (sigmoid law 1.10 -> 0.70 ns/element, L2-resident).
        lg = np.empty(cnt, x.dtype)
        xr, xo, tr, to, hr, ho = _task_blocks(x, xs, t, ts, h, hs, pair, ps, b0, nr, m_, n_, True)
        o = np.uint64(b0 * f)
        if kind == 0:
            _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, cnt, clamp, inverse, 0, _LAW, _CV)
        elif kind == 1:
            _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, cnt, clamp, inverse, 1, _LAW, _CV)
        else:
            _fwd_run(xr, xo, tr, to, hr, ho, out, o, lg, cnt, clamp, inverse, 2, _LAW, _CV)
        # The task's (b, m) runs lie back to back in the block (run i at i*N), summed per run,
        # then per row in m order: the same order whatever the layout.
        rs = np.empty(nr * m_, np.float64)
        if kind == 0:
            _run_sums(hr, ho, n_, nr * m_, rs)
        else:
            _run_sums(lg, np.uint64(0), n_, nr * m_, rs)
        for r in range(nr):
            acc = 0.0
            for m in range(m_):
                acc += rs[r * m_ + m]
            lad[b0 + r] = -acc if inverse else acc


@slp
@nb.njit(parallel=True, **_NJIT, cache=True)
def _affine_bwd_kernel(go, gos, gl, gls, x, xs, t, ts, h, hs, pair, ps, shape, rows, kind, clamp, inverse, gx, gh):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    f = m_ * n_
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        b0 = c * rows
        nr = min(nb_, b0 + rows) - b0
        cnt = nr * f
        # An output gradient with all-zero strides is one value broadcast (what ``y.sum()``
        # hands back): read in place, not gathered into a block.
        gconst = gos[0] == 0 and gos[1] == 0 and gos[2] == 0
        if gconst:
            gr, g0 = go, np.uint64(0)
        else:
            gr, g0 = _block(go, gos, b0, nr, m_, n_, np.empty(cnt, x.dtype))
        # the forward's backward needs no shift
        xr, xo, tr, to, hr, ho = _task_blocks(x, xs, t, ts, h, hs, pair, ps, b0, nr, m_, n_, inverse)
        # One run per row (its log-det gradient is a scalar): a per-element copy of it would be
        # one more stream, and past ~6 streams LLVM gives up the runtime alias checks and the
        # loop stays scalar.
        for r in range(nr):
            e = np.uint64(r * f)
            o = np.uint64((b0 + r) * f)
            g = _CV(gl[(b0 + r) * gls[0]])
            if kind == 0:
                if gconst:
                    _bwd_run(gr, g0, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 0, _LAW, _CV, True)
                else:
                    _bwd_run(gr, g0 + e, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 0, _LAW, _CV, False)
            elif kind == 1:
                if gconst:
                    _bwd_run(gr, g0, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 1, _LAW, _CV, True)
                else:
                    _bwd_run(gr, g0 + e, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 1, _LAW, _CV, False)
            else:
                if gconst:
                    _bwd_run(gr, g0, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 2, _LAW, _CV, True)
                else:
                    _bwd_run(gr, g0 + e, xr, xo + e, tr, to + e, hr, ho + e, gx, gh, o, g, f,
                             clamp, inverse, 2, _LAW, _CV, False)


def _arithmetic_clone(kernel, suffix, **overrides):
    """A separately compiled (and cached) copy of a kernel whose globals ``overrides`` replace."""
    fn = kernel.py_func
    g = dict(fn.__globals__)
    g.update(overrides)
    clone = pytypes.FunctionType(fn.__code__, g, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + suffix
    clone.__module__ = fn.__module__
    return slp(nb.njit(parallel=True, **_NJIT, cache=True)(clone))


_affine_fwd_kernel32 = _arithmetic_clone(_affine_fwd_kernel, "32", _LAW=_terms32, _CV=_as32)
_affine_bwd_kernel32 = _arithmetic_clone(_affine_bwd_kernel, "32", _LAW=_terms32, _CV=_as32)


_KINDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}


@slp
@nb.njit(parallel=True, **_NJIT, cache=True)
def _additive_fwd_kernel(x, xs, t, ts, shape, rows, inverse, out):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    f = m_ * n_
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        # A task's rows as one run per input (in place when C-contiguous), as the affine law.
        # (With backend=None on the CPU this law is torch's x + t: see fastflow/ops/coupling.py.)
        b0 = c * rows
        nr = min(nb_, b0 + rows) - b0
        cnt = nr * f
        xr, xo = _block(x, xs, b0, nr, m_, n_, np.empty(cnt, x.dtype))
        tr, to = _block(t, ts, b0, nr, m_, n_, np.empty(cnt, x.dtype))
        o = np.uint64(b0 * f)
        if inverse:
            for j in range(cnt):
                k = np.uint64(j)
                out[o + k] = xr[xo + k] - tr[to + k]
        else:
            for j in range(cnt):
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


@slp
@nb.njit(parallel=True, **_NJIT, cache=True)
def _rescale_fwd_kernel(x, xs, e, shape, rows, out):
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    f = m_ * n_
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        b0 = c * rows
        nr = min(nb_, b0 + rows) - b0
        xr, xo = _block(x, xs, b0, nr, m_, n_, np.empty(nr * f, x.dtype))
        for r in range(nr):  # one loop per sample over its whole event (e is event-shaped)
            xe = xo + np.uint64(r * f)
            o = np.uint64((b0 + r) * f)
            for j in range(f):
                k = np.uint64(j)
                out[o + k] = np.float64(xr[xe + k]) * e[k]


@slp
@nb.njit(parallel=True, **_NJIT, cache=True)
def _rescale_bwd_kernel(go, gos, x, xs, e, shape, rows, gx, partial):
    """gx = go * e; partial[c, f] = sum over chunk c's rows of go * x * e (the output's gradient
    contribution to log_scale, before the sign); chunks are fixed by the shape, so the final
    sum over chunks is reproducible."""
    nb_, m_, n_ = shape[0], shape[1], shape[2]
    f = m_ * n_
    nchunks = (nb_ + rows - 1) // rows
    for c in nb.prange(nchunks):
        b0 = c * rows
        nr = min(nb_, b0 + rows) - b0
        gr, g0 = _block(go, gos, b0, nr, m_, n_, np.empty(nr * f, x.dtype))
        xr, xo = _block(x, xs, b0, nr, m_, n_, np.empty(nr * f, x.dtype))
        pc = partial[c]
        for r in range(nr):  # rows in order: the partial sums' order is fixed by the shape
            e_ = np.uint64(r * f)
            o = np.uint64((b0 + r) * f)
            for j in range(f):
                k = np.uint64(j)
                gv = np.float64(gr[g0 + e_ + k])
                ev = e[k]
                gx[o + k] = gv * ev
                pc[k] += gv * np.float64(xr[xo + e_ + k]) * ev


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


class _Span:
    """A raw memory range exposed through the array interface: ``np.asarray`` of it is a view
    (``numpy.lib.stride_tricks.as_strided`` builds the same in ~4 us, this in ~1 us; a launch
    makes up to six of them, which matters for small batches)."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, owner: np.ndarray, address: int, count: int, typestr: str):
        self.__array_interface__ = {"data": (address, False), "shape": (count,), "typestr": typestr, "version": 3}
        self.owner = owner  # keeps the memory alive as long as the view


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _base(a: np.ndarray):
    """The 1-D buffer spanning a strided array (from its first element) and its element strides."""
    item = a.itemsize
    strides = [s // item for s in a.strides]
    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, strides)) if a.size else 0
    buf = np.asarray(_Span(a, _address(a), span, a.dtype.str))
    if a.ndim == 1:
        strides = [strides[0], 0, 0]
    return buf, np.array(strides, dtype=np.int64)


def _on_tensors(launcher):
    """``launcher`` on torch tensors: numpy views of the inputs without copies (``Tensor.numpy()``
    keeps the strides), new tensors out; the array launcher stays as ``.arrays``."""

    @functools.wraps(launcher)
    def on_tensors(*args):
        out = launcher(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else tuple(torch.from_numpy(o) for o in out)

    on_tensors.arrays = launcher
    return on_tensors


def _rows(shape) -> int:
    f = max(1, shape[1] * shape[2])
    return max(1, min(shape[0], _CHUNK_ELEMS // f))


def _tasks(shape, rows) -> int:
    return (shape[0] + rows - 1) // rows


_NO_PAIR = (np.empty(0, np.uint64), np.zeros(3, np.int64))


def _pairs(shift, raw_scale):
    """(pair view, its strides) when float32 ``shift`` and ``raw_scale`` are the two columns of
    one ``(..., 2)`` buffer, as a coupling layer's ``params[..., 0]``/``params[..., 1]``: the
    64-bit words holding both, with strides in words. Else an empty view (gathered apart)."""
    if shift.dtype != np.float32 or raw_scale.dtype != np.float32 or shift.strides != raw_scale.strides:
        return _NO_PAIR
    a = _address(shift)
    words = [s // 8 if n > 1 else 0 for s, n in zip(shift.strides, shift.shape)]  # size-1 dims: any stride
    if _address(raw_scale) != a + 4 or a % 8 or any(
            s % 8 or s < 0 for s, n in zip(shift.strides, shift.shape) if n > 1):
        return _NO_PAIR
    span = 1 + sum((n - 1) * w for n, w in zip(shift.shape, words))
    # The span covers raw_scale's last element too (the high half of shift's last word).
    pair = np.asarray(_Span(shift, a, span, "<u8"))
    return pair, np.array(words, dtype=np.int64)


# The float32 softclamp law evaluates exp(+-log s) with exp32_bounded, exact for |log s| <= 87
# (= clamp). A larger clamp (a scale up to e^clamp, past float32's range from ~88.7) takes the
# float64-arithmetic kernel, rounded once on the store: results as the float64 law gives them.
SOFTCLAMP32_MAX = 87.0


def _arithmetic(kernel32, kernel64, dtype, scale, clamp):
    if dtype == np.float32 and not (scale == "softclamp" and clamp > SOFTCLAMP32_MAX):
        return kernel32
    return kernel64


@_on_tensors
def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    """``x, shift, raw_scale (B, M, N)`` strided arrays of one dtype -> ``(out (B, M, N), lad (B,))``."""
    shape = np.array(x.shape, dtype=np.int64)
    out = np.empty(x.shape, x.dtype)
    lad = np.empty(x.shape[0], x.dtype)
    if x.size:
        kernel = _arithmetic(_affine_fwd_kernel32, _affine_fwd_kernel, x.dtype, scale, clamp)
        rows = _rows(x.shape)
        launch(kernel, _tasks(x.shape, rows), *_base(x), *_base(shift), *_base(raw_scale), *_pairs(shift, raw_scale),
               shape, rows, _KINDS[scale], x.dtype.type(clamp), bool(inverse), out.reshape(-1), lad)
    else:
        lad[:] = 0
    return out, lad


@_on_tensors
def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    """Fused backward: ``(grad x, grad raw_scale)``, contiguous ``(B, M, N)``."""
    shape = np.array(x.shape, dtype=np.int64)
    gx = np.empty(x.shape, x.dtype)
    gh = np.empty(x.shape, x.dtype)
    if x.size:
        kernel = _arithmetic(_affine_bwd_kernel32, _affine_bwd_kernel, x.dtype, scale, clamp)
        rows = _rows(x.shape)
        launch(kernel, _tasks(x.shape, rows), *_base(g_out), *_base(g_lad), *_base(x), *_base(shift), *_base(raw_scale),
               *_pairs(shift, raw_scale), shape, rows, _KINDS[scale], x.dtype.type(clamp), bool(inverse),
               gx.reshape(-1), gh.reshape(-1))
    return gx, gh


@_on_tensors
def additive_fwd(x, shift, inverse):
    shape = np.array(x.shape, dtype=np.int64)
    out = np.empty(x.shape, x.dtype)
    if x.size:
        rows = _rows(x.shape)
        launch(_additive_fwd_kernel, _tasks(x.shape, rows), *_base(x), *_base(shift), shape, rows, bool(inverse),
               out.reshape(-1))
    return out


def _rescale_prep(log_scale, inverse):
    m_, n_ = log_scale.shape
    e = np.empty(m_ * n_, np.float64)
    buf, st = _base(log_scale[None])
    total = _rescale_prep_kernel(buf, st, m_, n_, -1.0 if inverse else 1.0, e) if e.size else 0.0
    return e, total


@_on_tensors
def rescale_fwd(x, log_scale, inverse):
    """``x (B, M, N)``, ``log_scale (M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    e, total = _rescale_prep(log_scale, inverse)
    out = np.empty(x.shape, x.dtype)
    if x.size:
        rows = _rows(x.shape)
        launch(_rescale_fwd_kernel, _tasks(x.shape, rows), *_base(x), e, np.array(x.shape, dtype=np.int64), rows,
               out.reshape(-1))
    lad = np.full(x.shape[0], -total if inverse else total, dtype=x.dtype)
    return out, lad


@_on_tensors
def rescale_bwd(g_out, g_lad, x, log_scale, inverse):
    """``(grad x (B, M, N), grad log_scale (M, N))``."""
    e, _ = _rescale_prep(log_scale, inverse)
    gx = np.empty(x.shape, x.dtype)
    g_ls = np.empty(log_scale.shape, x.dtype)
    rows = _rows(x.shape)
    nchunks = (x.shape[0] + rows - 1) // rows
    partial = np.zeros((nchunks, e.size), np.float64)
    if x.size:
        launch(_rescale_bwd_kernel, nchunks, *_base(g_out), *_base(x), e, np.array(x.shape, dtype=np.int64), rows,
               gx.reshape(-1), partial)
    if g_ls.size:
        _reduce_partials(partial, *_base(g_lad), x.shape[0], -1.0 if inverse else 1.0, g_ls.reshape(-1))
    return gx, g_ls
