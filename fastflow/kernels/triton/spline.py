"""Triton kernels for the rational-quadratic spline: fused forward/inverse and backward.

Each program takes a block of rows (elements) and the whole padded bin dimension ``KP`` as a
2-D tile: softmax, cumulative sum, bin search and the gathers are row reductions over the
tile, so every raw parameter is read once and nothing is written but the results.
float16/bfloat16/float32 storage computed in float32; float64 storage computed in float64.

Tile size: ``BLOCK * KP`` is ~512 entries per 4-warp program (4 per thread per tile), at most 64
rows. The first version held 4096 (32 per thread): the sm_90 compile (``fastflow bench
gpu-model``) then used all 255 registers and spilled up to 10 KB per thread in the backward; at
512 every specialisation fits without spilling (see ``benchmarks/results/gpu_model.json``).

Knots: the bin sizes' running sum is taken in float64 whatever the compute dtype, and each knot
rounded once. A float32 scan rounds at each of its log2(K)..K additions, and at K=64 that made
the knots, hence the widths near the upper end and the x-gradient, several times less accurate
than nflows' (whose CPU ``cumsum`` accumulates float32 in double).

Parameterisations (kernels/reference/spline.py): the constexpr ``KIND`` selects the prologue,
raw parameters -> knots and slopes, in the same fused kernels: 0 "nflows" (the code above it
always was: the same SASS), 1 "nflows_bounded" (the box [left, right] x [bottom, top], K+1
slopes ``md + softplus``), 2 "zuko" (soft-bounded raw values, no minimum bin size, interior
slopes ``exp``, unit boundary slopes). The box travels as four float64 scalars (unused by 0).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels._facts import SPLINE_PARAMETERIZATIONS
from fastflow.kernels.reference.spline import flat_rows
from fastflow.kernels.triton import BACKEND
from fastflow.kernels.triton._aot import TRITON_TYPES, Spec, f64, make_spec, ptr, unique


NUM_WARPS = 4
_TILE = 512  # tile entries per program: 4 per thread at 4 warps
_MAX_ROWS = 64


@triton.jit
def _ct(v, F64: tl.constexpr):
    """``v`` in the compute dtype: float64 for float64 storage, float32 otherwise."""
    # tl.cast, not .to: the interpreter passes scalar arguments as Python floats.
    if F64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) to a few ulps in the compute dtype, without a libdevice call.

    log1p(e) as log(u) * e / (u - 1), u = 1 + e rounded (Goldberg's identity): the plain
    log(1 + e) loses log(1+e)'s relative accuracy to the rounding of 1 + e (3e-5 relative at
    e = 2e-3 in float32), and with it the derivatives min_derivative + softplus(z) of strongly
    negative z: that was the larger part of the float32 gradient error against nflows."""
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.maximum(z, 0.0) + lp


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _knots(u_ptr, rows, rmask, cols, cmask, K: tl.constexpr, bound, min_size, F64: tl.constexpr):
    """softmax probabilities (BLOCK, KP) and each bin's right knot (BLOCK, KP).

    Bin j spans [right[j-1], right[j]] (right[-1] = -bound): left knots are never recomputed
    separately, so adjacent bins share their knot bit for bit and no point falls in a gap.
    """
    u = tl.load(u_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    u = tl.where(cmask[None, :], _ct(u, F64), float("-inf"))
    m = tl.max(u, axis=1)
    e = tl.exp(u - m[:, None])
    e = tl.where(cmask[None, :], e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    size = tl.where(cmask[None, :], min_size + (1.0 - min_size * K) * p, 0.0)
    # The running sum in float64 (see the module docstring), each knot rounded once.
    cum = tl.cumsum(size.to(tl.float64), axis=1)
    b64 = tl.cast(bound, tl.float64)
    right = _ct(2.0 * b64 * cum - b64, F64)
    right = tl.where(cols[None, :] >= K - 1, bound, right)
    return p, right


@triton.jit
def _pick(t, sel):
    return tl.sum(tl.where(sel, t, 0.0), axis=1)


@triton.jit
def _bin(x, rw, rh, cols, K: tl.constexpr, INVERSE: tl.constexpr, x0, y0):
    """Each row's bin (the number of interior knots <= x: a value on a knot takes the bin to its
    right) and its left knot, width, bottom, height and slope; ``x0``/``y0`` start bin 0."""
    knots = rh if INVERSE else rw
    idx = tl.sum(tl.where((cols[None, :] < K - 1) & (x[:, None] >= knots), 1, 0), axis=1)
    sel = cols[None, :] == idx[:, None]
    sel_left = cols[None, :] == (idx - 1)[:, None]
    xk = tl.where(idx == 0, x0, _pick(rw, sel_left))
    wk = _pick(rw, sel) - xk
    yk = tl.where(idx == 0, y0, _pick(rh, sel_left))
    hk = _pick(rh, sel) - yk
    return idx, xk, wk, yk, hk, hk / wk


@triton.jit
def _theta(x, xk, wk, yk, hk, s, dk, dk1, INVERSE: tl.constexpr):
    """The position in the bin: ``(x - xk) / wk``, or for the inverse the root of the bin's
    quadratic in the numerically stable form."""
    if INVERSE:
        dy = x - yk
        sum_d = dk + dk1 - 2.0 * s
        qa = hk * (s - dk) + dy * sum_d
        qb = hk * dk - dy * sum_d
        qc = -s * dy
        disc = tl.maximum(qb * qb - 4.0 * qa * qc, 0.0)
        # Rounding can push the root a hair outside the bin; the bin's map is only monotone on
        # [0, 1], so clamp (float32 arithmetic, unlike the float64 CPU kernels, needs it).
        theta = tl.minimum(tl.maximum((2.0 * qc) / (-qb - tl.sqrt(disc)), 0.0), 1.0)
    else:
        theta = (x - xk) / wk
    return theta


@triton.jit
def _locate(x, ud_ptr, rows, inside, cols, cmask, rw, rh, K: tl.constexpr, INVERSE: tl.constexpr, bound, md,
            F64: tl.constexpr):
    """Bin index and local quantities for each row, as in the numba/reference kernels."""
    idx, xk, wk, yk, hk, s = _bin(x, rw, rh, cols, K, INVERSE, -bound, -bound)
    lm = inside & (idx >= 1)
    hm = inside & (idx + 1 <= K - 1)
    zl = _ct(tl.load(ud_ptr + rows * (K - 1) + idx - 1, mask=lm, other=0.0), F64)
    zh = _ct(tl.load(ud_ptr + rows * (K - 1) + idx, mask=hm, other=0.0), F64)
    dk = tl.where(lm, md + _softplus(zl), 1.0)
    dk1 = tl.where(hm, md + _softplus(zh), 1.0)
    theta = _theta(x, xk, wk, yk, hk, s, dk, dk1, INVERSE)
    return idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta


@triton.jit
def _knots_box(u_ptr, rows, rmask, cols, cmask, K: tl.constexpr, lo_, hi_, hi, min_size, clip, CLIP: tl.constexpr,
               F64: tl.constexpr):
    """:func:`_knots` on the interval ``[lo_, hi_]`` (float64 scalars; ``hi`` the end knot in the
    compute dtype), after zuko's soft bound ``u / (1 + |u clip|)`` when ``CLIP``. Also returns the
    raw values (0 in masked entries) for the soft bound's derivative in the backward."""
    raw = _ct(tl.load(u_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0), F64)
    if CLIP:
        v = raw / (1.0 + tl.abs(raw * clip))
    else:
        v = raw
    u = tl.where(cmask[None, :], v, float("-inf"))
    m = tl.max(u, axis=1)
    e = tl.exp(u - m[:, None])
    e = tl.where(cmask[None, :], e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    size = tl.where(cmask[None, :], min_size + (1.0 - min_size * K) * p, 0.0)
    cum = tl.cumsum(size.to(tl.float64), axis=1)  # in float64, each knot rounded once (module docstring)
    lo64 = tl.cast(lo_, tl.float64)
    right = _ct((tl.cast(hi_, tl.float64) - lo64) * cum + lo64, F64)
    right = tl.where(cols[None, :] >= K - 1, hi, right)
    return p, right, raw


@triton.jit
def _locate_box(x, ud_ptr, rows, inside, cols, rw, rh, K: tl.constexpr, INVERSE: tl.constexpr, KIND: tl.constexpr,
                left, bottom, md, clip_d, F64: tl.constexpr):
    """:func:`_locate` for the box parameterisations: bin 0 starts at ``left``/``bottom``; the knot
    slopes are ``md + softplus`` of K+1 raw values (KIND 1, nflows_bounded) or ``exp`` of the
    soft-bounded K-1 interior raw values with unit boundary slopes (KIND 2, zuko)."""
    idx, xk, wk, yk, hk, s = _bin(x, rw, rh, cols, K, INVERSE, left, bottom)
    if KIND == 1:
        lm = inside
        hm = inside
        zl = _ct(tl.load(ud_ptr + rows * (K + 1) + idx, mask=inside, other=0.0), F64)
        zh = _ct(tl.load(ud_ptr + rows * (K + 1) + idx + 1, mask=inside, other=0.0), F64)
        dk = md + _softplus(zl)
        dk1 = md + _softplus(zh)
    else:
        lm = inside & (idx >= 1)
        hm = inside & (idx + 1 <= K - 1)
        zl = _ct(tl.load(ud_ptr + rows * (K - 1) + idx - 1, mask=lm, other=0.0), F64)
        zh = _ct(tl.load(ud_ptr + rows * (K - 1) + idx, mask=hm, other=0.0), F64)
        dk = tl.where(lm, tl.exp(zl / (1.0 + tl.abs(zl * clip_d))), 1.0)
        dk1 = tl.where(hm, tl.exp(zh / (1.0 + tl.abs(zh * clip_d))), 1.0)
    theta = _theta(x, xk, wk, yk, hk, s, dk, dk1, INVERSE)
    return idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta


@triton.jit
def _box_prologue(x, rmask, uw_ptr, uh_ptr, ud_ptr, rows, cols, cmask, left_, right_, bottom_, top_, mbw, mbh, md,
                  K: tl.constexpr, INVERSE: tl.constexpr, KIND: tl.constexpr, F64: tl.constexpr):
    """Everything up to the bin's local coordinates for KIND 1 (nflows_bounded) and 2 (zuko)."""
    left, right, bottom, top = _ct(left_, F64), _ct(right_, F64), _ct(bottom_, F64), _ct(top_, F64)
    if INVERSE:
        inside = rmask & (x >= bottom) & (x <= top)
    else:
        inside = rmask & (x >= left) & (x <= right)
    if KIND == 2:
        # zuko: soft bounds 2/log(slope) (widths, heights) and 1/log(slope) (slopes), no minimum size
        clip = 2.0 / tl.log(md)
        clip_d = 0.5 * clip  # 1 / log(slope), the same bits (halving is exact)
        mw = 0.0 * md
        mh = 0.0 * md
    else:
        clip = 0.0 * md
        clip_d = 0.0 * md
        mw = mbw
        mh = mbh
    pw, rw, raww = _knots_box(uw_ptr, rows, inside, cols, cmask, K, left_, right_, right, mw, clip, KIND == 2, F64)
    ph, rh, rawh = _knots_box(uh_ptr, rows, inside, cols, cmask, K, bottom_, top_, top, mh, clip, KIND == 2, F64)
    idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta = _locate_box(
        x, ud_ptr, rows, inside, cols, rw, rh, K, INVERSE, KIND, left, bottom, md, clip_d, F64
    )
    return (inside, pw, ph, raww, rawh, mw, mh, clip, clip_d, idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm,
            theta)


@triton.jit
def _rq_spline_fwd_kernel(
    x_ptr, uw_ptr, uh_ptr, ud_ptr, out_ptr, lad_ptr, n,
    # float64 scalars whatever the storage (Python floats; rounded in the kernel for float32).
    bound_: tl.float64, mbw_: tl.float64, mbh_: tl.float64, md_: tl.float64,
    # the box of KIND 1/2 (unused by KIND 0, whose box is [-bound, bound]^2)
    left_: tl.float64, right_: tl.float64, bottom_: tl.float64, top_: tl.float64,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
    KIND: tl.constexpr,
):
    bound, mbw, mbh, md = _ct(bound_, F64), _ct(mbw_, F64), _ct(mbh_, F64), _ct(md_, F64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cols = tl.arange(0, KP)
    cmask = cols < K
    xr = tl.load(x_ptr + rows, mask=rmask, other=0.0)
    x = _ct(xr, F64)
    if KIND == 0:
        inside = rmask & (x >= -bound) & (x <= bound)
        pw, rw = _knots(uw_ptr, rows, inside, cols, cmask, K, bound, mbw, F64)
        ph, rh = _knots(uh_ptr, rows, inside, cols, cmask, K, bound, mbh, F64)
        idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta = _locate(
            x, ud_ptr, rows, inside, cols, cmask, rw, rh, K, INVERSE, bound, md, F64
        )
    else:
        (inside, pw, ph, raww, rawh, mw, mh, clip, clip_d, idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm,
         theta) = _box_prologue(x, rmask, uw_ptr, uh_ptr, ud_ptr, rows, cols, cmask, left_, right_, bottom_, top_,
                                mbw, mbh, md, K, INVERSE, KIND, F64)
    t = theta * (1.0 - theta)
    den = s + (dk + dk1 - 2.0 * s) * t
    num = s * s * (dk1 * theta * theta + 2.0 * s * t + dk * (1.0 - theta) * (1.0 - theta))
    ld = tl.log(num) - 2.0 * tl.log(den)
    if INVERSE:
        out = xk + theta * wk
        ld = -ld
    else:
        out = yk + hk * (s * theta * theta + dk * t) / den
    out = tl.where(inside, out, x)
    ld = tl.where(inside, ld, tl.where(x != x, x, 0.0))
    tl.store(out_ptr + rows, out.to(xr.dtype), mask=rmask)
    tl.store(lad_ptr + rows, ld.to(xr.dtype), mask=rmask)


@triton.jit
def _knot_grads(p, cols, cmask, idx, g_lo, g_hi, K: tl.constexpr, bound, min_size):
    """d/d raw sizes of knot-position gradients g_lo (knot idx) and g_hi (knot idx+1)."""
    scale = 2.0 * bound * (1.0 - min_size * K)
    glo = tl.where(idx >= 1, g_lo * scale, 0.0)
    ghi = tl.where(idx + 1 <= K - 1, g_hi * scale, 0.0)
    c = cols[None, :]
    gp = tl.where(c < idx[:, None], glo[:, None], 0.0) + tl.where(c <= idx[:, None], ghi[:, None], 0.0)
    gp = tl.where(cmask[None, :], gp, 0.0)
    dot = tl.sum(p * gp, axis=1)
    return p * (gp - dot[:, None])


@triton.jit
def _rq_spline_bwd_kernel(
    gout_ptr, glad_ptr, x_ptr, uw_ptr, uh_ptr, ud_ptr, gx_ptr, guw_ptr, guh_ptr, gud_ptr, n,
    bound_: tl.float64, mbw_: tl.float64, mbh_: tl.float64, md_: tl.float64,
    left_: tl.float64, right_: tl.float64, bottom_: tl.float64, top_: tl.float64,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
    KIND: tl.constexpr,
):
    bound, mbw, mbh, md = _ct(bound_, F64), _ct(mbw_, F64), _ct(mbh_, F64), _ct(md_, F64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cols = tl.arange(0, KP)
    cmask = cols < K
    xr = tl.load(x_ptr + rows, mask=rmask, other=0.0)
    x = _ct(xr, F64)
    go = _ct(tl.load(gout_ptr + rows, mask=rmask, other=0.0), F64)
    gl = _ct(tl.load(glad_ptr + rows, mask=rmask, other=0.0), F64)
    if KIND == 0:
        inside = rmask & (x >= -bound) & (x <= bound)
        pw, rw = _knots(uw_ptr, rows, inside, cols, cmask, K, bound, mbw, F64)
        ph, rh = _knots(uh_ptr, rows, inside, cols, cmask, K, bound, mbh, F64)
        idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta = _locate(
            x, ud_ptr, rows, inside, cols, cmask, rw, rh, K, INVERSE, bound, md, F64
        )
    else:
        (inside, pw, ph, raww, rawh, mw, mh, clip, clip_d, idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm,
         theta) = _box_prologue(x, rmask, uw_ptr, uh_ptr, ud_ptr, rows, cols, cmask, left_, right_, bottom_, top_,
                                mbw, mbh, md, K, INVERSE, KIND, F64)
    tt = theta * (1.0 - theta)
    omt = 1.0 - theta
    om2 = 1.0 - 2.0 * theta
    sd = dk + dk1 - 2.0 * s
    den = s + sd * tt
    nn = s * theta * theta + dk * tt
    mm = dk1 * theta * theta + 2.0 * s * tt + dk * omt * omt
    iden = 1.0 / den
    iden2 = iden * iden
    im = 1.0 / mm
    dy_dth = hk * ((2.0 * s * theta + dk * om2) * den - nn * sd * om2) * iden2
    dy_ds = hk * (theta * theta * den - nn * (1.0 - 2.0 * tt)) * iden2
    dy_dhk = nn * iden
    dy_ddk = hk * tt * (den - nn) * iden2
    dy_ddk1 = -hk * nn * tt * iden2
    dl_dth = (2.0 * dk1 * theta + 2.0 * s * om2 - 2.0 * dk * omt) * im - 2.0 * sd * om2 * iden
    dl_ds = 2.0 / s + 2.0 * tt * im - 2.0 * (1.0 - 2.0 * tt) * iden
    dl_ddk = omt * omt * im - 2.0 * tt * iden
    dl_ddk1 = theta * theta * im - 2.0 * tt * iden
    if INVERSE:
        # Implicit function theorem: dx/dy = 1/f', dx/dp = -(df/dp)/f'; output log-det is -lad.
        gx = (go - gl * dl_dth / wk) * wk / dy_dth
        a = -gx
        b = -gl
    else:
        a = go
        b = gl
        gx = (a * dy_dth + b * dl_dth) / wk
    g_th = a * dy_dth + b * dl_dth
    g_s = a * dy_ds + b * dl_ds
    g_wk = -(g_th * theta + g_s * s) / wk
    g_hk = a * dy_dhk + g_s / wk
    if KIND == 0:
        guw = _knot_grads(pw, cols, cmask, idx, -g_th / wk - g_wk, g_wk, K, bound, mbw)
        guh = _knot_grads(ph, cols, cmask, idx, a - g_hk, g_hk, K, bound, mbh)
    else:
        # _knot_grads scales by 2*bound: half the interval's length, rounded once from float64
        half_w = _ct(0.5 * (tl.cast(right_, tl.float64) - tl.cast(left_, tl.float64)), F64)
        half_h = _ct(0.5 * (tl.cast(top_, tl.float64) - tl.cast(bottom_, tl.float64)), F64)
        guw = _knot_grads(pw, cols, cmask, idx, -g_th / wk - g_wk, g_wk, K, half_w, mw)
        guh = _knot_grads(ph, cols, cmask, idx, a - g_hk, g_hk, K, half_h, mh)
        if KIND == 2:
            # d/du of zuko's u / (1 + |u c|) is 1 / (1 + |u c|)^2
            qw = 1.0 + tl.abs(raww * clip)
            qh = 1.0 + tl.abs(rawh * clip)
            guw = guw / (qw * qw)
            guh = guh / (qh * qh)
    inside2 = inside[:, None]
    guw = tl.where(inside2, guw, 0.0)
    guh = tl.where(inside2, guh, 0.0)
    gx = tl.where(inside, gx, go)
    if KIND == 2:
        # slope = exp(z / (1 + |z c|)): d/dz = slope / (1 + |z c|)^2
        ql = 1.0 + tl.abs(zl * clip_d)
        qh2 = 1.0 + tl.abs(zh * clip_d)
        g_dk = tl.where(lm, (a * dy_ddk + b * dl_ddk) * (dk / (ql * ql)), 0.0)
        g_dk1 = tl.where(hm, (a * dy_ddk1 + b * dl_ddk1) * (dk1 / (qh2 * qh2)), 0.0)
    else:
        g_dk = tl.where(lm, (a * dy_ddk + b * dl_ddk) * _sigmoid(zl), 0.0)
        g_dk1 = tl.where(hm, (a * dy_ddk1 + b * dl_ddk1) * _sigmoid(zh), 0.0)
    c = cols[None, :]
    if KIND == 1:
        # K+1 raw slopes, the bin's at idx and idx+1; column K (beyond the KP-wide tile when K = KP)
        # is stored on its own.
        gud = tl.where(c == idx[:, None], g_dk[:, None], 0.0) + tl.where(c == (idx + 1)[:, None], g_dk1[:, None], 0.0)
    else:
        gud = tl.where(c == (idx - 1)[:, None], g_dk[:, None], 0.0) + tl.where(c == idx[:, None], g_dk1[:, None], 0.0)
    m2 = rmask[:, None] & cmask[None, :]
    tl.store(gx_ptr + rows, gx.to(xr.dtype), mask=rmask)
    tl.store(guw_ptr + rows[:, None] * K + c, guw.to(xr.dtype), mask=m2)
    tl.store(guh_ptr + rows[:, None] * K + c, guh.to(xr.dtype), mask=m2)
    if KIND == 1:
        tl.store(gud_ptr + rows[:, None] * (K + 1) + c, gud.to(xr.dtype), mask=m2)
        tl.store(gud_ptr + rows * (K + 1) + K, tl.where(idx == K - 1, g_dk1, 0.0).to(xr.dtype), mask=rmask)
    else:
        tl.store(gud_ptr + rows[:, None] * (K - 1) + c, gud.to(xr.dtype), mask=rmask[:, None] & (c < K - 1))


# The prologues (raw parameters -> knots and slopes) the kernels' KIND constexpr selects, by the
# codes of the one table (kernels/_facts.py; the kernels test KIND == 1 for "nflows_bounded" and
# KIND == 2 for "zuko"); see kernels/reference/spline.py.
KINDS = {name: SPLINE_PARAMETERIZATIONS[name].code for name in BACKEND.parameterizations}
assert KINDS == {"nflows": 0, "nflows_bounded": 1, "zuko": 2}, "the kernels' KIND literals follow the table"


@functools.lru_cache(maxsize=None)
def launch_spec(k: int, dtype: torch.dtype, inverse: bool, backward: bool, parameterization: str = "nflows") -> Spec:
    """The specialisation ``fwd``/``bwd`` launch for ``K = k`` bins, storage ``dtype`` and the
    ``parameterization``'s prologue: the launchers take their constexprs and ``num_warps`` from
    here, and so do the ahead-of-time compile test and the resource model."""
    kp = triton.next_power_of_2(max(k, 2))
    # float64 values take two registers: half the tile (170 -> ~90 registers in the backward)
    block = max(1, min(_MAX_ROWS, (_TILE // 2 if dtype == torch.float64 else _TILE) // kp))
    kernel = _rq_spline_bwd_kernel if backward else _rq_spline_fwd_kernel
    types = {a: ptr(dtype) for a in kernel.arg_names if a.endswith("_ptr")}
    types.update(bound_="fp64", mbw_="fp64", mbh_="fp64", md_="fp64", left_="fp64", right_="fp64", bottom_="fp64",
                 top_="fp64")
    constexprs = dict(K=k, KP=kp, INVERSE=bool(inverse), F64=dtype == torch.float64, BLOCK=block,
                      KIND=KINDS[parameterization])
    kind = "" if parameterization == "nflows" else f" {parameterization}"
    label = f"spline{kind} {'bwd' if backward else 'fwd'}{' inverse' if inverse else ''} K={k} {TRITON_TYPES[dtype]}"
    # n: a large batch (the JIT types it i32, 16-divisible); its value never changes the code.
    return make_spec(kernel, types, constexprs, NUM_WARPS, label, ints={"n": 2**20})


def specializations() -> list[Spec]:
    """The distinct specialisations the ahead-of-time compile covers. nflows: every storage dtype
    x direction x INVERSE at K=8 and K=64, and in float32 every bin padding KP=2..1024 (K=KP and a
    padded K=KP/2+1). K is a constexpr, so each K is its own specialisation; these K take every
    tile shape and row count the heuristic produces. The other prologues (nflows_bounded, zuko;
    the same tiles, other arithmetic): every dtype x direction x INVERSE at K=8 and K=64, and in
    float32 the extreme tiles K=2 (64 rows of 2) and K=1024 (one row of 1024)."""
    ks = sorted({8, 64} | {kp for kp in (2 ** i for i in range(1, 11))} | {kp // 2 + 1 for kp in (8, 32, 128, 1024)})
    out = []
    for backward in (False, True):
        for inverse in (False, True):
            for dtype in TRITON_TYPES:
                for k in (8, 64):
                    out.append(launch_spec(k, dtype, inverse, backward))
            for k in ks:
                out.append(launch_spec(k, torch.float32, inverse, backward))
    for parameterization in ("nflows_bounded", "zuko"):
        for backward in (False, True):
            for inverse in (False, True):
                for dtype in TRITON_TYPES:
                    for k in (8, 64):
                        out.append(launch_spec(k, dtype, inverse, backward, parameterization))
                for k in (2, 1024):
                    out.append(launch_spec(k, torch.float32, inverse, backward, parameterization))
    return unique(out)


def _launch(spec: Spec, n: int, args):
    grid = (triton.cdiv(n, dict(spec.constexprs)["BLOCK"]),)
    with torch.cuda.device(args[0].device) if args[0].is_cuda else _nullctx():
        spec.kernel[grid](*args, **spec.launch_kwargs())


def _scalars(parameterization, box, mbw, mbh, md):
    left, right, bottom, top = box
    return tuple(map(f64, (right, mbw, mbh, md, left, right, bottom, top)))


def _forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    n, k = uw.shape
    out = torch.empty_like(x)
    lad = torch.empty_like(x)
    if n:
        _launch(launch_spec(k, x.dtype, bool(inverse), False, parameterization), n,
                (x, uw, uh, ud, out, lad, n, *_scalars(parameterization, box, mbw, mbh, md)))
    return out, lad


def _backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    n, k = uw.shape
    g_x = torch.empty_like(x)
    g_uw = torch.empty_like(uw)
    g_uh = torch.empty_like(uh)
    g_ud = torch.empty_like(ud)
    if n:
        _launch(launch_spec(k, x.dtype, bool(inverse), True, parameterization), n,
                (g_out, g_lad, x, uw, uh, ud, g_x, g_uw, g_uh, g_ud, n,
                 *_scalars(parameterization, box, mbw, mbh, md)))
    return g_x, g_uw, g_uh, g_ud


def _nflows_box(tb):
    tb = float(tb)
    return (-tb, tb, -tb, tb)


def fwd(x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher (nflows). ``x (N,)``, ``uw, uh (N, K)``, ``ud (N, K-1)``: contiguous, one dtype/device."""
    return _forward(x, uw, uh, ud, inverse, "nflows", _nflows_box(tb), mbw, mbh, md)


def bwd(g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher of the fused backward (nflows): gradients for ``x, uw, uh, ud``."""
    return _backward(g_out, g_lad, x, uw, uh, ud, inverse, "nflows", _nflows_box(tb), mbw, mbh, md)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# The launcher interface of kernels/<backend>/spline.py (see kernels/reference/spline.py).
PARAMETERIZATIONS = BACKEND.parameterizations


def _check_kind(parameterization, k, ud):
    if parameterization not in KINDS:
        raise ValueError(f"triton rq_spline: no kernels for the {parameterization!r} parameterization; "
                         f"expected one of {PARAMETERIZATIONS}")
    nd = k + 1 if parameterization == "nflows_bounded" else k - 1
    if ud.dim() != 2 or ud.shape[1] != nd:
        raise ValueError(f"triton rq_spline ({parameterization}): derivatives must be (N, {nd}) for K={k} bins, "
                         f"got {tuple(ud.shape)}")


def forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    rows = flat_rows(x, uw, uh, ud)
    _check_kind(parameterization, rows[1].shape[1], rows[3])
    out, lad = _forward(*rows, inverse, parameterization, box, mbw, mbh, md)
    return out.view(x.shape), lad.view(x.shape)


def backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    rows = flat_rows(x, uw, uh, ud)
    _check_kind(parameterization, rows[1].shape[1], rows[3])
    g = _backward(g_out.reshape(-1).contiguous(), g_lad.reshape(-1).contiguous(), *rows, inverse, parameterization,
                  box, mbw, mbh, md)
    return tuple(gi.view(t.shape) for gi, t in zip(g, (x, uw, uh, ud)))
