"""Triton kernels for the rational-quadratic spline: fused forward/inverse and backward.

Each program takes a block of rows (elements) and the whole padded bin dimension ``KP`` as a
2-D tile: softmax, cumulative sum, bin search and the gathers are row reductions over the
tile, so every raw parameter is read once and nothing is written but the results.
float16/bfloat16/float32 storage, float32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(z):
    e = tl.exp(-tl.abs(z))
    # log1p(e) without a libdevice call: for small e the series is exact to fp32.
    lp = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
    return tl.maximum(z, 0.0) + lp


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _knots(u_ptr, rows, rmask, cols, cmask, K: tl.constexpr, bound, min_size):
    """softmax probabilities (BLOCK, KP) and each bin's right knot (BLOCK, KP).

    Bin j spans [right[j-1], right[j]] (right[-1] = -bound): left knots are never recomputed
    separately, so adjacent bins share their knot bit for bit and no point falls in a gap.
    """
    u = tl.load(u_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    u = tl.where(cmask[None, :], u.to(tl.float32), float("-inf"))
    m = tl.max(u, axis=1)
    e = tl.exp(u - m[:, None])
    e = tl.where(cmask[None, :], e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    size = tl.where(cmask[None, :], min_size + (1.0 - min_size * K) * p, 0.0)
    cum = tl.cumsum(size, axis=1)
    right = tl.where(cols[None, :] >= K - 1, bound, 2.0 * bound * cum - bound)
    return p, right


@triton.jit
def _pick(t, sel):
    return tl.sum(tl.where(sel, t, 0.0), axis=1)


@triton.jit
def _locate(x, ud_ptr, rows, inside, cols, cmask, rw, rh, K: tl.constexpr, INVERSE: tl.constexpr, bound, md):
    """Bin index and local quantities for each row, as in the numba/reference kernels."""
    knots = rh if INVERSE else rw
    # Bin = number of interior knots <= x (a value on a knot takes the bin to its right).
    idx = tl.sum(tl.where((cols[None, :] < K - 1) & (x[:, None] >= knots), 1, 0), axis=1)
    sel = cols[None, :] == idx[:, None]
    sel_left = cols[None, :] == (idx - 1)[:, None]
    xk = tl.where(idx == 0, -bound, _pick(rw, sel_left))
    wk = _pick(rw, sel) - xk
    yk = tl.where(idx == 0, -bound, _pick(rh, sel_left))
    hk = _pick(rh, sel) - yk
    s = hk / wk
    lm = inside & (idx >= 1)
    hm = inside & (idx + 1 <= K - 1)
    zl = tl.load(ud_ptr + rows * (K - 1) + idx - 1, mask=lm, other=0.0).to(tl.float32)
    zh = tl.load(ud_ptr + rows * (K - 1) + idx, mask=hm, other=0.0).to(tl.float32)
    dk = tl.where(lm, md + _softplus(zl), 1.0)
    dk1 = tl.where(hm, md + _softplus(zh), 1.0)
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
    return idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta


@triton.jit
def _rq_spline_fwd_kernel(
    x_ptr, uw_ptr, uh_ptr, ud_ptr, out_ptr, lad_ptr, n, bound, mbw, mbh, md,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cols = tl.arange(0, KP)
    cmask = cols < K
    xr = tl.load(x_ptr + rows, mask=rmask, other=0.0)
    x = xr.to(tl.float32)
    inside = rmask & (x >= -bound) & (x <= bound)
    pw, rw = _knots(uw_ptr, rows, inside, cols, cmask, K, bound, mbw)
    ph, rh = _knots(uh_ptr, rows, inside, cols, cmask, K, bound, mbh)
    idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta = _locate(
        x, ud_ptr, rows, inside, cols, cmask, rw, rh, K, INVERSE, bound, md
    )
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
    gout_ptr, glad_ptr, x_ptr, uw_ptr, uh_ptr, ud_ptr, gx_ptr, guw_ptr, guh_ptr, gud_ptr,
    n, bound, mbw, mbh, md,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    cols = tl.arange(0, KP)
    cmask = cols < K
    xr = tl.load(x_ptr + rows, mask=rmask, other=0.0)
    x = xr.to(tl.float32)
    go = tl.load(gout_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    gl = tl.load(glad_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    inside = rmask & (x >= -bound) & (x <= bound)
    pw, rw = _knots(uw_ptr, rows, inside, cols, cmask, K, bound, mbw)
    ph, rh = _knots(uh_ptr, rows, inside, cols, cmask, K, bound, mbh)
    idx, xk, wk, yk, hk, s, dk, dk1, zl, zh, lm, hm, theta = _locate(
        x, ud_ptr, rows, inside, cols, cmask, rw, rh, K, INVERSE, bound, md
    )
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
    guw = _knot_grads(pw, cols, cmask, idx, -g_th / wk - g_wk, g_wk, K, bound, mbw)
    guh = _knot_grads(ph, cols, cmask, idx, a - g_hk, g_hk, K, bound, mbh)
    inside2 = inside[:, None]
    guw = tl.where(inside2, guw, 0.0)
    guh = tl.where(inside2, guh, 0.0)
    gx = tl.where(inside, gx, go)
    g_dk = tl.where(lm, (a * dy_ddk + b * dl_ddk) * _sigmoid(zl), 0.0)
    g_dk1 = tl.where(hm, (a * dy_ddk1 + b * dl_ddk1) * _sigmoid(zh), 0.0)
    c = cols[None, :]
    gud = tl.where(c == (idx - 1)[:, None], g_dk[:, None], 0.0) + tl.where(c == idx[:, None], g_dk1[:, None], 0.0)
    m2 = rmask[:, None] & cmask[None, :]
    tl.store(gx_ptr + rows, gx.to(xr.dtype), mask=rmask)
    tl.store(guw_ptr + rows[:, None] * K + c, guw.to(xr.dtype), mask=m2)
    tl.store(guh_ptr + rows[:, None] * K + c, guh.to(xr.dtype), mask=m2)
    tl.store(gud_ptr + rows[:, None] * (K - 1) + c, gud.to(xr.dtype), mask=rmask[:, None] & (c < K - 1))


def _launch_cfg(n: int, k: int):
    kp = triton.next_power_of_2(max(k, 2))
    # ~4096 tile entries per program keeps the (BLOCK, KP) tiles in registers for any K.
    block = max(16, min(1024, 4096 // kp))
    return kp, block, (triton.cdiv(n, block),)


def fwd(x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher. ``x (N,)``, ``uw, uh (N, K)``, ``ud (N, K-1)``: contiguous, one dtype/device."""
    n, k = uw.shape
    out = torch.empty_like(x)
    lad = torch.empty_like(x)
    kp, block, grid = _launch_cfg(n, k)
    with torch.cuda.device(x.device) if x.is_cuda else _nullctx():
        _rq_spline_fwd_kernel[grid](
            x, uw, uh, ud, out, lad, n, float(tb), float(mbw), float(mbh), float(md),
            K=k, KP=kp, INVERSE=bool(inverse), BLOCK=block,
        )
    return out, lad


def bwd(g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher of the fused backward: gradients for ``x, uw, uh, ud``."""
    n, k = uw.shape
    g_x = torch.empty_like(x)
    g_uw = torch.empty_like(uw)
    g_uh = torch.empty_like(uh)
    g_ud = torch.empty_like(ud)
    kp, block, grid = _launch_cfg(n, k)
    with torch.cuda.device(x.device) if x.is_cuda else _nullctx():
        _rq_spline_bwd_kernel[grid](
            g_out, g_lad, x, uw, uh, ud, g_x, g_uw, g_uh, g_ud, n,
            float(tb), float(mbw), float(mbh), float(md),
            K=k, KP=kp, INVERSE=bool(inverse), BLOCK=block,
        )
    return g_x, g_uw, g_uh, g_ud


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
