"""Numba CPU kernels for the rational-quadratic spline: fused forward/inverse and backward.

One parallel pass over the elements, all arithmetic in float64 whatever the storage dtype (so
float32 results carry only the final rounding). One kernel per direction serves every
parameterisation (its code in ``kernels/_facts.SPLINE_PARAMETERIZATIONS``): a parameterisation
is a prologue (raw values -> knots and knot slopes) and an epilogue of the backward (the
prologue's chain rule), selected once per tile; the spline's core between them is shared.

Elements go in tiles of ``_TILE``, and every phase of a tile is a loop over the tile's
elements that LLVM vectorises (one element per SIMD lane):

1. load: the tile's raw widths/heights transposed into a (K, TILE) scratch, one strided
   (gathered) load per bin and lane (the element-major transposition cost 3x as much);
2. prologue: softmax, exp and cumulative knots as element-wise loops over the tile;
3. search and gather: each element's bin by comparisons against the K-1 interior knots
   (branch-free, summed), then the bin's knots and raw slopes by indexed loads;
4. core: the slopes, the rational quadratic (or its inverse) and the log-det; in the backward
   their analytic partials, giving the gradients of the bin's two knots of each kind and of
   its two slopes;
5. (backward) the chain rule through the softmax, a (K, TILE) pass, and the transposed store
   of the K-sized gradients; the two slope gradients go to their columns by comparisons.

Our own exp/log (``_math``) keep the loops vectorised, and division follows the IEEE model
(``error_model="numpy"``), whose results are the same but whose code has no exception branch.
The backward recomputes the forward from the inputs (nothing is saved between the two).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from numba import types
from numba.extending import overload

from fastflow.kernels.numba._math import exp as _exp
from fastflow.kernels.numba._math import exp32 as _exp32
from fastflow.kernels.numba._math import log as _log
from fastflow.kernels.numba._math import log1p_unit as _log1p_unit
from fastflow.kernels.numba._math import log1p_unit32 as _log1p_unit32
from fastflow.kernels._facts import SPLINE_PARAMETERIZATIONS
from fastflow.kernels.numba._bridge import rows
from fastflow.kernels.numba._threads import launch

# Elements per parallel task: large enough to amortise the scratch allocation and scheduling,
# small enough to balance two to a few dozen threads.
_CHUNK = 2048
_TILE = 64  # a multiple of the vector width; _CHUNK is a multiple of it
_UT = np.uint64(_TILE)

_FASTMATH = {"contract", "arcp"}  # no nnan/ninf (NaN must propagate), no reassoc (bitwise reproducible)
# IEEE division (x/0 -> inf/NaN) instead of Numba's default Python model, whose ZeroDivisionError
# branch on every division stops LLVM from vectorising any loop that divides.
_NJIT = dict(fastmath=_FASTMATH, error_model="numpy")

_F32 = np.float32


def _f32(like):
    return isinstance(like, types.Array) and like.dtype == types.float32


# float32 lanes (see _lanes): the exponentials of the softmax and of the softplus slopes in
# float32 arithmetic (exp32: 1 ulp, twice the SIMD lanes, no table lookup), everything else in
# float64.
def _exp_as(x, like):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


def _softplus_sigmoid_as(z, like):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(_exp_as, jit_options=_NJIT)
def _ov_exp_as(x, like):
    """exp(x) in float64, or in float32 arithmetic where ``like`` is a float32 array."""
    if _f32(like):
        return lambda x, like: np.float64(_exp32(np.float32(x)))
    return lambda x, like: _exp(x)


@overload(_softplus_sigmoid_as, jit_options=_NJIT)
def _ov_softplus_sigmoid_as(z, like):
    """(softplus(z), sigmoid(z)) from one exponential, e = exp(-|z|): softplus = max(z, 0) +
    log1p(e), sigmoid = 1/(1+e) or e/(1+e); in float32 arithmetic where ``like`` is float32."""
    if _f32(like):
        def impl(z, like):
            zf = np.float32(z)
            e = _exp32(-abs(zf))
            sp = max(zf, _F32(0.0)) + _log1p_unit32(e)
            return np.float64(sp), np.float64((_F32(1.0) if zf >= 0 else e) / (_F32(1.0) + e))
        return impl

    def impl(z, like):
        e = _exp(-abs(z))
        return max(z, 0.0) + _log1p_unit(e), (1.0 if z >= 0 else e) / (1.0 + e)
    return impl


# The parameterisations' codes, from the one table (kernels/_facts.py, SPLINE_PARAMETERIZATIONS):
# "nflows" (unconstrained, linear tails: the identity outside the interval, unit boundary
# slopes), "nflows_bounded" (K+1 slopes md + softplus(raw) on the box [left, right] x [bottom,
# top]), "zuko" (raw values soft-bounded by log(slope), softmax without minimum, slopes
# exp(clip(raw)), unit boundary slopes). See kernels/reference/spline.py.
NFLOWS, BOUNDED, ZUKO = (SPLINE_PARAMETERIZATIONS[p].code for p in ("nflows", "nflows_bounded", "zuko"))

# Rows of the per-tile scratch ``st`` (flat, _TILE per row: constant offsets let LLVM prove
# the rows disjoint and vectorise the loops that read some and write others).
(_V, _XK, _WK, _YK, _HK, _RLO, _RHI, _DK, _DK1, _SLO, _SHI, _OUT, _LAD,
 _GO, _GL, _GX, _GWLO, _GWHI, _GHLO, _GHHI, _GDLO, _GDHI, _M, _TOT) = range(24)
_ROWS = 24


@nb.njit(**_NJIT, cache=True)
def _scratch(k, like):
    """Per-task scratch: the flat rows, the bin indices, the transposed raw values (in the
    storage dtype of ``like``), the widths' and heights' probabilities and knots, and a (K+1,
    TILE) gradient block."""
    return (
        np.zeros(_ROWS * _TILE, np.float64),
        np.zeros(_TILE, np.int64),
        np.zeros((k, _TILE), like.dtype),
        np.zeros((k, _TILE), np.float64),
        np.zeros((k + 1, _TILE), np.float64),
        np.zeros((k, _TILE), np.float64),
        np.zeros((k + 1, _TILE), np.float64),
        np.zeros((k + 1, _TILE), np.float64),
    )


@nb.njit(inline="always", **_NJIT)
def _load_tile(u, i0, n, ut):
    """``ut[j, t] = u[i0 + t, j]``; in the last tile, rows past ``n`` repeat row n-1.

    Bin-major (one strided load per bin and lane) with unsigned indices (no wrap-around
    select): LLVM vectorises it, and it costs a third of the element-major loop."""
    k = u.shape[1]
    f = u.reshape(-1)
    ku = np.uint64(k)
    if i0 + _TILE <= n:
        b = np.uint64(i0) * ku
        for j in range(ku):
            for t in range(_UT):
                ut[j, t] = f[b + t * ku + j]
    else:
        for j in range(k):
            for t in range(_TILE):
                ut[j, t] = u[min(i0 + t, n - 1), j]


@nb.njit(**_NJIT, cache=True)  # compiled on its own (not inlined): LLVM vectorises it there
def _softmax_knots(ut, lo, hi, min_size, st, prob, knots):
    """Raw values ``ut`` -> softmax ``prob[:k, t]`` and knot positions ``knots[:k+1, t]``.

    Knot j is ``(hi - lo) * sum_{i<j} size_i + lo`` with ``size = min_size + (1 - min_size*k)
    * softmax(u)``; the end knots are pinned to lo and hi. Rows _M and _TOT of ``st`` are
    scratch."""
    k = ut.shape[0]
    m = st[_M * _TILE:(_M + 1) * _TILE]
    tot = st[_TOT * _TILE:(_TOT + 1) * _TILE]
    for t in range(_TILE):
        m[t] = ut[0, t]
    for j in range(1, k):
        for t in range(_TILE):
            m[t] = max(m[t], ut[j, t])
    for t in range(_TILE):
        tot[t] = 0.0
    for j in range(k):
        for t in range(_TILE):
            e = _exp_as(ut[j, t] - m[t], ut)
            prob[j, t] = e
            tot[t] += e
    scale = 1.0 - min_size * k
    width = hi - lo
    for t in range(_TILE):
        tot[t] = 1.0 / tot[t]
        m[t] = 0.0  # reused as the running cumulative size
        knots[0, t] = lo
    for j in range(k):
        for t in range(_TILE):
            p = prob[j, t] * tot[t]
            prob[j, t] = p
            m[t] += min_size + scale * p
            knots[j + 1, t] = width * m[t] + lo
    for t in range(_TILE):
        knots[k, t] = hi


@nb.njit(**_NJIT, cache=True)
def _soft_clip(ut, clip):
    """zuko's soft bound ``u / (1 + |u * clip|)`` of the raw widths or heights, in place."""
    k = ut.shape[0]
    for j in range(k):
        for t in range(_TILE):
            v = ut[j, t]
            ut[j, t] = v / (1.0 + abs(v * clip))


@nb.njit(inline="always", **_NJIT)
def _prologue(kind, u, i0, n, lo, hi, min_size, clip, ut, st, prob, knots):
    _load_tile(u, i0, n, ut)
    if kind == ZUKO:
        _soft_clip(ut, clip)
    _softmax_knots(ut, lo, hi, min_size, st, prob, knots)


@nb.njit(**_NJIT, cache=True)
def _search_gather(x, ud, i0, n, inverse, kind, cw, ch, st, ix):
    """Each element's bin (nflows' rule: a value on a knot takes the bin to its right; the
    upper bound takes the last bin), the bin's knots and its two knots' raw slopes.

    Branch-free and vectorised: the bin is the number of interior knots <= v (a sum of
    comparisons); the raw slopes' columns are clamped so that every load is in bounds (the
    boundary slopes' flags are the bin index itself, see :func:`_slopes`)."""
    k = cw.shape[0] - 1
    nd = ud.shape[1]
    fd = ud.reshape(-1)
    for t in range(_TILE):
        st[_V * _TILE + t] = np.float64(x[min(i0 + t, n - 1)])
        ix[t] = 0
    knots = ch if inverse else cw
    for j in range(1, k):
        for t in range(_TILE):
            ix[t] += st[_V * _TILE + t] >= knots[j, t]
    fw = cw.reshape(-1)
    fh = ch.reshape(-1)
    off = 1 if kind == BOUNDED else 0  # the raw slopes of bin idx are columns idx-1+off, idx+off
    for t in range(_TILE):
        idx = ix[t]
        a = idx * _TILE + t
        xk = fw[a]
        yk = fh[a]
        st[_XK * _TILE + t] = xk
        st[_WK * _TILE + t] = fw[a + _TILE] - xk
        st[_YK * _TILE + t] = yk
        st[_HK * _TILE + t] = fh[a + _TILE] - yk
        r = min(i0 + t, n - 1) * nd
        st[_RLO * _TILE + t] = fd[r + min(max(idx - 1 + off, 0), nd - 1)]
        st[_RHI * _TILE + t] = fd[r + min(idx + off, nd - 1)]


@nb.njit(**_NJIT, cache=True)
def _slopes(kind, k, md, clip_d, st, ix, with_derivative, like):
    """Rows _DK, _DK1: the bin's two knot slopes from their raw values (rows _RLO, _RHI); with
    ``with_derivative``, rows _SLO, _SHI: each slope's derivative in its raw value (0 for a
    constant boundary slope). The softplus runs in float32 where ``like`` is float32."""
    for t in range(_TILE):
        idx = ix[t]
        rlo = st[_RLO * _TILE + t]
        rhi = st[_RHI * _TILE + t]
        if kind == NFLOWS:
            at_lo = idx == 0
            at_hi = idx == k - 1
            splo, siglo = _softplus_sigmoid_as(rlo, like)
            sphi, sighi = _softplus_sigmoid_as(rhi, like)
            dk = 1.0 if at_lo else md + splo
            dk1 = 1.0 if at_hi else md + sphi
            if with_derivative:
                st[_SLO * _TILE + t] = 0.0 if at_lo else siglo
                st[_SHI * _TILE + t] = 0.0 if at_hi else sighi
        elif kind == BOUNDED:
            splo, siglo = _softplus_sigmoid_as(rlo, like)
            sphi, sighi = _softplus_sigmoid_as(rhi, like)
            dk = md + splo
            dk1 = md + sphi
            if with_derivative:
                st[_SLO * _TILE + t] = siglo
                st[_SHI * _TILE + t] = sighi
        else:
            at_lo = idx == 0
            at_hi = idx == k - 1
            qlo = 1.0 + abs(rlo * clip_d)
            qhi = 1.0 + abs(rhi * clip_d)
            dk = 1.0 if at_lo else _exp_as(rlo / qlo, like)
            dk1 = 1.0 if at_hi else _exp_as(rhi / qhi, like)
            if with_derivative:
                st[_SLO * _TILE + t] = 0.0 if at_lo else dk / (qlo * qlo)
                st[_SHI * _TILE + t] = 0.0 if at_hi else dk1 / (qhi * qhi)
        st[_DK * _TILE + t] = dk
        st[_DK1 * _TILE + t] = dk1


@nb.njit(inline="always", **_NJIT)
def _invert_theta(dy, hk, s, dk, dk1):
    """Root in [0, 1] of the bin's quadratic, in the cancellation-free form 2c/(-b - sqrt(D)).

    A discriminant that rounding pushed below zero (nflows asserts there) is clamped to 0.
    """
    sum_d = dk + dk1 - 2.0 * s
    qa = hk * (s - dk) + dy * sum_d
    qb = hk * dk - dy * sum_d
    qc = -s * dy
    disc = max(qb * qb - 4.0 * qa * qc, 0.0)
    return (2.0 * qc) / (-qb - math.sqrt(disc))


@nb.njit(**_NJIT, cache=True)  # compiled on its own (not inlined): LLVM vectorises it there
def _evaluate_tile(st, inverse, lo, hi):
    """Rational quadratic (or its inverse) and log-det of the tile's elements from their bin
    data; rows _OUT and _LAD receive the results. Branch-free: values outside [lo, hi] (and
    NaN) are computed on garbage and then replaced by the identity tails."""
    for t in range(_TILE):
        v = st[_V * _TILE + t]
        xk = st[_XK * _TILE + t]
        wk = st[_WK * _TILE + t]
        yk = st[_YK * _TILE + t]
        hk = st[_HK * _TILE + t]
        dk = st[_DK * _TILE + t]
        dk1 = st[_DK1 * _TILE + t]
        s = hk / wk
        if inverse:
            theta = _invert_theta(v - yk, hk, s, dk, dk1)
        else:
            theta = (v - xk) / wk
        tt = theta * (1.0 - theta)
        den = s + (dk + dk1 - 2.0 * s) * tt
        num = s * s * (dk1 * theta * theta + 2.0 * s * tt + dk * (1.0 - theta) * (1.0 - theta))
        ld = _log(num / (den * den))
        if inverse:
            o = xk + theta * wk
            ld = -ld
        else:
            o = yk + hk * (s * theta * theta + dk * tt) / den
        inside = v >= lo and v <= hi
        st[_OUT * _TILE + t] = o if inside else v
        st[_LAD * _TILE + t] = ld if inside else (v if v != v else 0.0)


@nb.njit(inline="always", **_NJIT)
def _constants(kind, mbw, mbh, md):
    """(min bin width, min bin height, clip of widths/heights, clip of slopes) of a kind."""
    if kind == ZUKO:
        log_slope = math.log(md)
        return 0.0, 0.0, 2.0 / log_slope, 1.0 / log_slope
    return mbw, mbh, 0.0, 0.0


@nb.njit(parallel=True, **_NJIT, cache=True)
def _fwd_kernel(x, uw, uh, ud, inverse, kind, left, right, bottom, top, mbw, mbh, md, out, lad, lanes):
    n = x.shape[0]
    k = uw.shape[1]
    mw, mh, clip, clip_d = _constants(kind, mbw, mbh, md)
    lo = bottom if inverse else left
    hi = top if inverse else right
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in nb.prange(nchunks):
        st, ix, ut, pw, cw, ph, ch, _ = _scratch(k, lanes)
        for i0 in range(c * _CHUNK, min(n, (c + 1) * _CHUNK), _TILE):
            nt = min(_TILE, n - i0)
            _prologue(kind, uw, i0, n, left, right, mw, clip, ut, st, pw, cw)
            _prologue(kind, uh, i0, n, bottom, top, mh, clip, ut, st, ph, ch)
            _search_gather(x, ud, i0, n, inverse, kind, cw, ch, st, ix)
            _slopes(kind, k, md, clip_d, st, ix, False, ut)
            _evaluate_tile(st, inverse, lo, hi)
            for t in range(nt):
                out[i0 + t] = st[_OUT * _TILE + t]
                lad[i0 + t] = st[_LAD * _TILE + t]


@nb.njit(**_NJIT, cache=True)  # compiled on its own (not inlined): LLVM vectorises it there
def _derivatives_tile(st, inverse, lo, hi):
    """The core of the backward: from the bin data and the output gradients (rows _GO, _GL),
    the gradients of the input (row _GX), of the bin's two width knots (rows _GWLO, _GWHI)
    and height knots (_GHLO, _GHHI) and of its two slopes' raw values (_GDLO, _GDHI).

    Partials of y = yk + hk*N/den and lad = log(s^2 M) - 2 log(den) in the local variables
    (theta, s, hk, yk, dk, dk1), holding the others fixed; for the inverse, the implicit
    function theorem. Outside [lo, hi] (the identity) only the input's gradient is nonzero."""
    for t in range(_TILE):
        v = st[_V * _TILE + t]
        xk = st[_XK * _TILE + t]
        wk = st[_WK * _TILE + t]
        yk = st[_YK * _TILE + t]
        hk = st[_HK * _TILE + t]
        dk = st[_DK * _TILE + t]
        dk1 = st[_DK1 * _TILE + t]
        go = st[_GO * _TILE + t]
        gl = st[_GL * _TILE + t]
        s = hk / wk
        inv_wk = 1.0 / wk
        if inverse:
            theta = _invert_theta(v - yk, hk, s, dk, dk1)
        else:
            theta = (v - xk) * inv_wk
        tt = theta * (1.0 - theta)
        omt = 1.0 - theta
        one_m_2th = 1.0 - 2.0 * theta
        sd = dk + dk1 - 2.0 * s
        den = s + sd * tt
        nn = s * theta * theta + dk * tt
        mm = dk1 * theta * theta + 2.0 * s * tt + dk * omt * omt
        inv_den = 1.0 / den
        inv_den2 = inv_den * inv_den
        inv_m = 1.0 / mm
        dy_dth = hk * ((2.0 * s * theta + dk * one_m_2th) * den - nn * sd * one_m_2th) * inv_den2
        dy_ds = hk * (theta * theta * den - nn * (1.0 - 2.0 * tt)) * inv_den2
        dy_dhk = nn * inv_den
        dy_ddk = hk * tt * (den - nn) * inv_den2
        dy_ddk1 = -hk * nn * tt * inv_den2
        dl_dth = ((2.0 * dk1 * theta + 2.0 * s * one_m_2th - 2.0 * dk * omt) * inv_m
                  - 2.0 * sd * one_m_2th * inv_den)
        dl_ds = 2.0 / s + 2.0 * tt * inv_m - 2.0 * (1.0 - 2.0 * tt) * inv_den
        dl_ddk = omt * omt * inv_m - 2.0 * tt * inv_den
        dl_ddk1 = theta * theta * inv_m - 2.0 * tt * inv_den
        if inverse:
            # x = f^-1(y): by the implicit function theorem dx/dy = 1/f' and
            # dx/dp = -(df/dp)/f'; the returned log-det is -lad(x(y, p), p).
            gx = (go - gl * dl_dth * inv_wk) * wk / dy_dth
            a = -gx  # weight of df/dp
            b = -gl  # weight of dlad/dp
        else:
            a = go
            b = gl
            gx = (a * dy_dth + b * dl_dth) * inv_wk
        g_th = a * dy_dth + b * dl_dth
        g_s = a * dy_ds + b * dl_ds
        # theta = (x - xk)/wk and s = hk/wk; xk, wk, yk, hk come from the knots.
        g_wk = -(g_th * theta + g_s * s) * inv_wk
        g_hk = a * dy_dhk + g_s * inv_wk
        inside = v >= lo and v <= hi
        st[_GX * _TILE + t] = gx if inside else go
        st[_GWLO * _TILE + t] = -g_th * inv_wk - g_wk if inside else 0.0
        st[_GWHI * _TILE + t] = g_wk if inside else 0.0
        st[_GHLO * _TILE + t] = a - g_hk if inside else 0.0
        st[_GHHI * _TILE + t] = g_hk if inside else 0.0
        st[_GDLO * _TILE + t] = (a * dy_ddk + b * dl_ddk) * st[_SLO * _TILE + t] if inside else 0.0
        st[_GDHI * _TILE + t] = (a * dy_ddk1 + b * dl_ddk1) * st[_SHI * _TILE + t] if inside else 0.0


@nb.njit(**_NJIT, cache=True)  # compiled on its own (not inlined): LLVM vectorises it there
def _softmax_grads(prob, ix, st, row_lo, row_hi, scale, g):
    """Chain d/d(knot idx) and d/d(knot idx+1) (rows ``row_lo``, ``row_hi`` of ``st``) back
    to the raw sizes: ``g[:k, t]``.

    Knot j (0 < j < k) is ``scale/(1 - min_size*k) * sum_{i<j} size_i + lo`` with ``size =
    min_size + (1 - min_size*k) * softmax(u)``; the end knots are constants."""
    k = prob.shape[0]
    glo = st[_M * _TILE:(_M + 1) * _TILE]
    ghi = st[_TOT * _TILE:(_TOT + 1) * _TILE]
    dot = st[_OUT * _TILE:(_OUT + 1) * _TILE]
    for t in range(_TILE):
        idx = ix[t]
        glo[t] = st[row_lo * _TILE + t] * scale if idx >= 1 else 0.0
        ghi[t] = st[row_hi * _TILE + t] * scale if idx + 1 <= k - 1 else 0.0
        dot[t] = 0.0
    for j in range(k):
        for t in range(_TILE):
            idx = ix[t]
            gp = (glo[t] if j < idx else 0.0) + (ghi[t] if j <= idx else 0.0)  # d/d prob_j
            g[j, t] = gp
            dot[t] += prob[j, t] * gp
    for j in range(k):
        for t in range(_TILE):
            g[j, t] = prob[j, t] * (g[j, t] - dot[t])


@nb.njit(**_NJIT, cache=True)
def _slope_grads(ix, st, off, g):
    """The raw slopes' gradient rows ``g[:nd, t]``: rows _GDLO, _GDHI of ``st`` in columns
    idx-1+off and idx+off, zero elsewhere (a boundary slope's column -1 or nd never matches)."""
    nd = g.shape[0]
    for j in range(nd):
        for t in range(_TILE):
            c = ix[t] - 1 + off
            g[j, t] = (st[_GDLO * _TILE + t] if j == c else 0.0) + (st[_GDHI * _TILE + t] if j == c + 1 else 0.0)


@nb.njit(inline="always", **_NJIT)
def _store_tile(g, out, i0, nt, ncols):
    """``out[i0 + t, j] = g[j, t]`` for the tile's ``nt`` rows and ``ncols`` columns."""
    f = out.reshape(-1)
    if nt == _TILE:
        ku = np.uint64(ncols)
        b = np.uint64(i0) * ku
        for t in range(_UT):
            for j in range(ku):
                f[b + t * ku + j] = g[j, t]
    else:
        for t in range(nt):
            for j in range(ncols):
                out[i0 + t, j] = g[j, t]


@nb.njit(inline="always", **_NJIT)
def _store_tile_clipped(g, out, u, clip, i0, nt):
    """:func:`_store_tile` through zuko's soft bound: its derivative is 1/(1 + |u clip|)^2."""
    k = out.shape[1]
    for t in range(nt):
        for j in range(k):
            q = 1.0 + abs(np.float64(u[i0 + t, j]) * clip)
            out[i0 + t, j] = g[j, t] / (q * q)


@nb.njit(parallel=True, **_NJIT, cache=True)
def _bwd_kernel(g_out, g_lad, x, uw, uh, ud, inverse, kind, left, right, bottom, top, mbw, mbh, md,
                g_x, g_uw, g_uh, g_ud, lanes):
    n = x.shape[0]
    k = uw.shape[1]
    nd = ud.shape[1]
    mw, mh, clip, clip_d = _constants(kind, mbw, mbh, md)
    lo = bottom if inverse else left
    hi = top if inverse else right
    scale_w = (right - left) * (1.0 - mw * k)
    scale_h = (top - bottom) * (1.0 - mh * k)
    off = 1 if kind == BOUNDED else 0
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in nb.prange(nchunks):
        st, ix, ut, pw, cw, ph, ch, g = _scratch(k, lanes)
        for i0 in range(c * _CHUNK, min(n, (c + 1) * _CHUNK), _TILE):
            nt = min(_TILE, n - i0)
            _prologue(kind, uw, i0, n, left, right, mw, clip, ut, st, pw, cw)
            _prologue(kind, uh, i0, n, bottom, top, mh, clip, ut, st, ph, ch)
            _search_gather(x, ud, i0, n, inverse, kind, cw, ch, st, ix)
            _slopes(kind, k, md, clip_d, st, ix, True, ut)
            for t in range(_TILE):
                r = min(i0 + t, n - 1)
                st[_GO * _TILE + t] = g_out[r]
                st[_GL * _TILE + t] = g_lad[r]
            _derivatives_tile(st, inverse, lo, hi)
            for t in range(nt):
                g_x[i0 + t] = st[_GX * _TILE + t]
            _softmax_grads(pw, ix, st, _GWLO, _GWHI, scale_w, g)
            if kind == ZUKO:
                _store_tile_clipped(g, g_uw, uw, clip, i0, nt)
            else:
                _store_tile(g, g_uw, i0, nt, k)
            _softmax_grads(ph, ix, st, _GHLO, _GHHI, scale_h, g)
            if kind == ZUKO:
                _store_tile_clipped(g, g_uh, uh, clip, i0, nt)
            else:
                _store_tile(g, g_uh, i0, nt, k)
            _slope_grads(ix, st, off, g[:nd])
            _store_tile(g, g_ud, i0, nt, nd)


def _tasks(x) -> int:
    return (x.shape[0] + _CHUNK - 1) // _CHUNK


_LANES32 = np.empty(0, np.float32)
_LANES64 = np.empty(0, np.float64)


def _lanes(x, inverse):
    """The dtype of the exponentials' arithmetic, as an empty array the kernels specialise on:
    float32 for float32 storage in the forward direction; float64 otherwise. The inverse keeps
    float64: its outputs carry the knots' error divided by the slope (|dx/dy| up to 1e3 here),
    so float32 exponentials would cost it digits that float32 storage still holds."""
    return _LANES32 if x.dtype == np.float32 and not inverse else _LANES64


def rq_spline_fwd(x, uw, uh, ud, inverse, kind, box, mbw, mbh, md):
    """Launcher. ``x (N,)``, ``uw, uh (N, K)``, ``ud (N, K-1)`` (``(N, K+1)`` for
    nflows_bounded) C-contiguous arrays of one dtype; ``box = (left, right, bottom, top)``."""
    out = np.empty_like(x)
    lad = np.empty_like(x)
    if x.shape[0]:
        left, right, bottom, top = (float(b) for b in box)
        launch(_fwd_kernel, _tasks(x), x, uw, uh, ud, bool(inverse), int(kind), left, right, bottom, top,
               float(mbw), float(mbh), float(md), out, lad, _lanes(x, inverse))
    return out, lad


def rq_spline_bwd(g_out, g_lad, x, uw, uh, ud, inverse, kind, box, mbw, mbh, md):
    """Launcher of the fused backward; returns gradients for ``x, uw, uh, ud``."""
    g_x = np.empty_like(x)
    g_uw = np.empty_like(uw)
    g_uh = np.empty_like(uh)
    g_ud = np.empty_like(ud)
    if x.shape[0]:
        left, right, bottom, top = (float(b) for b in box)
        launch(_bwd_kernel, _tasks(x), g_out, g_lad, x, uw, uh, ud, bool(inverse), int(kind), left, right, bottom,
               top, float(mbw), float(mbh), float(md), g_x, g_uw, g_uh, g_ud, _lanes(x, inverse))
    return g_x, g_uw, g_uh, g_ud


# --------------------------------------------------------------------------------------------
# The launcher interface of kernels/<backend>/spline.py (see kernels/reference/spline.py):
# torch tensors in and out, shared with numpy without copies.
# --------------------------------------------------------------------------------------------

def _kind(parameterization):
    return SPLINE_PARAMETERIZATIONS[parameterization].code


def forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    k = uw.shape[-1]
    out, lad = rq_spline_fwd(rows(x), rows(uw, k), rows(uh, k), rows(ud, ud.shape[-1]), inverse,
                             _kind(parameterization), box, mbw, mbh, md)
    shape = x.shape
    return torch.from_numpy(out.reshape(shape)), torch.from_numpy(lad.reshape(shape))


def backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    k, kd = uw.shape[-1], ud.shape[-1]
    g = rq_spline_bwd(rows(g_out), rows(g_lad), rows(x), rows(uw, k), rows(uh, k), rows(ud, kd), inverse,
                      _kind(parameterization), box, mbw, mbh, md)
    return tuple(torch.from_numpy(gi.reshape(t.shape)) for gi, t in zip(g, (x, uw, uh, ud)))
