"""Triton kernels of the Bernstein polynomial law (``fastflow::bernstein``): forward, inverse and
the fused backward of both, in one kernel specialised by ``INVERSE``/``BACKWARD``.

A program takes ``BLOCK`` elements and holds each one's ``M + 1`` coefficients across a
``MP``-wide row (``MP`` the next power of two above ``M = n + 4``): the softmax of the raw
values (read two columns to the right, so that column ``i`` holds step ``Delta_i``), the
coefficients by a cumulative sum, and the Bernstein bases of degrees ``M``, ``M - 1`` and
``M - 2`` in log space (``log C(M, i) + i log t + (M - i) log u``, with ``t`` and ``u = 1 - t``
each computed from ``x``, so that ``u`` keeps its digits near the upper end). The maths and
gradients are the reference's (``kernels/reference/bernstein.py``); the inverse is Newton in
``x`` kept inside a shrinking bracket (bisection where it would leave it), a fixed number of
steps. float16/bfloat16/float32 storage computed in float32; float64 computed in float64.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastflow.kernels.reference.bernstein import EPS
from fastflow.kernels.triton._aot import TRITON_TYPES, Spec, f64, make_spec, ptr, unique
from fastflow.kernels.triton.coupling import _ct, _device

NUM_WARPS = 4
_TILE = 2048  # elements x columns per program
_ITERS = {False: 40, True: 80}  # Newton/bisection steps of the inverse: float32, float64


@triton.jit
def _bases(x, cols, logc_ptr, bound, M: tl.constexpr, MP: tl.constexpr, CT: tl.constexpr):
    """The degree ``M``, ``M - 1`` and ``M - 2`` Bernstein bases at ``t = (x + B) / 2B``
    (``(BLOCK, MP)``, zero past each degree's last column)."""
    lt = tl.log((x + bound) / (2.0 * bound))
    lu = tl.log((bound - x) / (2.0 * bound))
    ci = cols.to(CT)
    lc0 = tl.load(logc_ptr + cols, mask=cols <= M, other=0.0).to(CT)
    lc1 = tl.load(logc_ptr + MP + cols, mask=cols <= M - 1, other=0.0).to(CT)
    lc2 = tl.load(logc_ptr + 2 * MP + cols, mask=cols <= M - 2, other=0.0).to(CT)
    e = ci[None, :] * lt[:, None]
    # exp(-inf) = 0 past each degree's last column (no overflow there)
    b0 = tl.exp(tl.where(cols[None, :] <= M, lc0[None, :] + e + (M - ci[None, :]) * lu[:, None], float("-inf")))
    b1 = tl.exp(tl.where(cols[None, :] <= M - 1, lc1[None, :] + e + (M - 1 - ci[None, :]) * lu[:, None],
                         float("-inf")))
    b2 = tl.exp(tl.where(cols[None, :] <= M - 2, lc2[None, :] + e + (M - 2 - ci[None, :]) * lu[:, None],
                         float("-inf")))
    return b0, b1, b2


@triton.jit
def _bernstein_kernel(z_ptr, raw_ptr, go_ptr, gl_ptr, out_ptr, lad_ptr, graw_ptr, logc_ptr, N, bound_: tl.float64,
                      eps_: tl.float64,
                      NRAW: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr,
                      BACKWARD: tl.constexpr, ITERS: tl.constexpr, F64: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    TOL: tl.constexpr = 4e-16 if F64 else 1e-7
    M: tl.constexpr = NRAW + 4
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    cols = tl.arange(0, MP)
    v = tl.load(z_ptr + rows, mask=rmask, other=0.0).to(CT)
    bound = _ct(bound_, F64)
    eps = _ct(eps_, F64)
    # the steps Delta_i: d at both pairs of ends, c * softmax(raw)_(i-2) between, 0 past M - 1
    j = cols - 2
    jm = (j >= 0) & (j < NRAW)
    lmask = rmask[:, None] & jm[None, :]
    r = tl.load(raw_ptr + rows[:, None] * NRAW + j[None, :], mask=lmask, other=0.0).to(CT)
    r = tl.where(jm[None, :], r, float("-inf"))
    ex = tl.exp(r - tl.max(r, axis=1)[:, None])
    s = ex / tl.sum(ex, axis=1)[:, None]
    d = 2.0 * bound / M
    c = 2.0 * bound - 4.0 * d
    zero = tl.zeros([BLOCK, MP], CT)
    edge = tl.where(cols[None, :] < M, zero + d, zero)
    delta = tl.where(jm[None, :], c * s, edge)
    theta = tl.cumsum(delta, axis=1) - delta - bound  # theta_i = -B + sum_(k < i) Delta_k
    # Delta_(i+1), for f'' (the same steps one column on)
    jn = cols - 1
    jnm = (jn >= 0) & (jn < NRAW)
    rn = tl.load(raw_ptr + rows[:, None] * NRAW + jn[None, :], mask=rmask[:, None] & jnm[None, :], other=0.0).to(CT)
    rn = tl.where(jnm[None, :], rn, float("-inf"))
    sn = tl.exp(rn - tl.max(r, axis=1)[:, None]) / tl.sum(ex, axis=1)[:, None]
    delta_next = tl.where(jnm[None, :], c * sn, tl.where(cols[None, :] + 1 < M, zero + d, zero))
    lo_x = -bound + 2.0 * bound * eps
    hi_x = bound - 2.0 * bound * eps
    if INVERSE:
        inside = (v > -bound) & (v < bound)
        # Newton for f(x) = v in x, kept in [lo, hi] (bisection where it would leave it)
        x = tl.minimum(tl.maximum(tl.where(inside, v, 0.0 * v), lo_x), hi_x)
        lo = tl.zeros([BLOCK], CT) + lo_x
        hi = tl.zeros([BLOCK], CT) + hi_x
        done = ~inside
        for _ in range(ITERS):
            b0, b1, b2 = _bases(x, cols, logc_ptr, bound, M, MP, CT)
            f = tl.sum(b0 * theta, axis=1)
            dfdx = tl.sum(b1 * delta, axis=1) * M / (2.0 * bound)
            res = f - tl.where(inside, v, 0.0 * v)
            step = res / dfdx
            converged = tl.abs(step) <= TOL * bound  # Newton's own step: at the resolution
            lo = tl.where(done | (res >= 0), lo, x)
            hi = tl.where(done | (res < 0), hi, x)
            xn = x - step
            xn = tl.where((xn > lo) & (xn < hi), xn, 0.5 * (lo + hi))
            x = tl.where(done, x, tl.where(converged, x - step, xn))
            done = done | converged
        x_in = x
    else:
        t = (v + bound) / (2.0 * bound)
        inside = ~((t <= eps) | (t >= 1.0 - eps))  # (a NaN is inside: it propagates)
        x_in = tl.where(inside, v, 0.0 * v)
    b0, b1, b2 = _bases(x_in, cols, logc_ptr, bound, M, MP, CT)
    fp = tl.sum(b1 * delta, axis=1) * M  # df/dt
    if not BACKWARD:
        if INVERSE:
            x_below = ((v + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
            x_above = ((v - bound) / (2.0 * bound) - eps + 1.0) * 2.0 * bound - bound
            y = tl.where(v <= -bound, x_below, tl.where(v >= bound, x_above, x_in))
            lad = tl.where(inside, tl.log(2.0 * bound) - tl.log(fp), 0.0 * v)
        else:
            y_below = 2.0 * bound * (t - eps) - bound
            y_above = 2.0 * bound * (t - 1.0 + eps) + bound
            f = tl.sum(b0 * theta, axis=1)
            y = tl.where(t <= eps, y_below, tl.where(t >= 1.0 - eps, y_above, f))
            lad = tl.where(inside, tl.log(fp) - tl.log(2.0 * bound), 0.0 * v)
        y = tl.where(v != v, v, y)
        lad = tl.where(v != v, v, lad)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)
        tl.store(lad_ptr + rows, lad.to(lad_ptr.dtype.element_ty), mask=rmask)
    else:
        go = tl.load(go_ptr + rows, mask=rmask, other=0.0).to(CT)
        gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0).to(CT)
        fpp = tl.sum(b2 * (delta_next - delta), axis=1) * (M * (M - 1))
        # dy/dDelta_i = sum_(k > i) b^M_k; d log f'/dDelta_i = M b^(M-1)_i / f'
        dy = tl.sum(b0, axis=1)[:, None] - tl.cumsum(b0, axis=1)
        dlad = M * b1 / fp[:, None]
        if INVERSE:
            dt = -dy / fp[:, None]
            g = (go * 2.0 * bound)[:, None] * dt - gl[:, None] * (dlad + (fpp / fp)[:, None] * dt)
            gz = go * 2.0 * bound / fp - gl * fpp / (fp * fp)
        else:
            g = go[:, None] * dy + gl[:, None] * dlad
            gz = go * fp / (2.0 * bound) + gl * fpp / (fp * 2.0 * bound)
        gs = tl.where(jm[None, :], c * g, zero)
        graw = s * (gs - tl.sum(gs * s, axis=1)[:, None])
        graw = tl.where(inside[:, None], graw, zero)
        gz = tl.where(inside, gz, go)
        tl.store(out_ptr + rows, gz.to(out_ptr.dtype.element_ty), mask=rmask)
        tl.store(graw_ptr + rows[:, None] * NRAW + j[None, :], graw.to(graw_ptr.dtype.element_ty), mask=lmask)


@functools.lru_cache(maxsize=None)
def _log_binomials(m: int, mp: int, device) -> torch.Tensor:
    """``(3, MP)`` float64: ``log C(m - k, i)`` for ``k = 0, 1, 2`` (0 past ``m - k``)."""
    out = torch.zeros(3, mp, dtype=torch.float64)
    for k in range(3):
        for i in range(m - k + 1):
            out[k, i] = math.lgamma(m - k + 1) - math.lgamma(i + 1) - math.lgamma(m - k - i + 1)
    return out.to(device)


def _canon(v: int) -> int:
    """A stand-in for ``N`` with the same JIT typing (1, i32 or i64, 16-divisible or not)."""
    if v == 1:
        return 1
    return (2**32 if v >= 2**31 else 32) + (0 if v % 16 == 0 else 1)


def launch_spec(n_raw: int, dtype: torch.dtype, inverse: bool, backward: bool, n: int = 32) -> Spec:
    """The specialisation a launch for ``n_raw`` raw coefficients of ``dtype`` requests."""
    return _spec(int(n_raw), dtype, bool(inverse), bool(backward), _canon(int(n)))


@functools.lru_cache(maxsize=None)
def _spec(n_raw, dtype, inverse, backward, n):
    f64 = dtype == torch.float64
    mp = triton.next_power_of_2(n_raw + 5)
    block = max(1, min(128, _TILE // mp))
    cx = dict(NRAW=n_raw, MP=mp, BLOCK=block, INVERSE=inverse, BACKWARD=backward, ITERS=_ITERS[f64] if inverse else 0,
              F64=f64)
    types = {a: ptr(dtype) for a in ("z_ptr", "raw_ptr", "go_ptr", "gl_ptr", "out_ptr", "lad_ptr", "graw_ptr")}
    types.update(logc_ptr=ptr(torch.float64), bound_="fp64", eps_="fp64")
    label = (f"bernstein {'bwd' if backward else 'fwd'}{' inverse' if inverse else ''} {TRITON_TYPES[dtype]} "
             f"n={n_raw}")
    return make_spec(_bernstein_kernel, types, cx, NUM_WARPS, label, ints=dict(N=n))


def specializations() -> list[Spec]:
    """Every direction x pass x storage dtype at zuko's BPF size (17 raw coefficients), and the
    widths 2, 60 and 507 (``MP`` 8, 64 and 512) in float32 and float64."""
    out = []
    for dtype in TRITON_TYPES:
        for n_raw in (17,) if dtype in (torch.float16, torch.bfloat16) else (2, 17, 60, 507):
            for inverse in (False, True):
                for backward in (False, True):
                    out.append(launch_spec(n_raw, dtype, inverse, backward, 2**20))
    return unique(out)


def _run(z, raw, go, gl, inverse, bound, backward):
    n = z.numel()
    n_raw = raw.shape[-1]
    out = torch.empty_like(z)
    second = torch.empty_like(raw) if backward else torch.empty_like(z)
    if n:
        spec = launch_spec(n_raw, z.dtype, inverse, backward, n)
        cx = dict(spec.constexprs)
        logc = _log_binomials(n_raw + 4, cx["MP"], z.device)
        grid = (triton.cdiv(n, cx["BLOCK"]),)
        lad, graw = (out, second) if backward else (second, out)
        with _device(z):
            spec.kernel[grid](z, raw, go, gl, out, lad, graw, logc, n, f64(bound), f64(EPS),
                              **spec.launch_kwargs())
    return out, second


def _flat(t, k=0):
    return (t.reshape(-1, k) if k else t.reshape(-1)).contiguous()


# The launcher interface of kernels/<backend>/bernstein.py (see kernels/reference/bernstein.py).

def forward(x, raw, inverse, bound):
    z, r = _flat(x), _flat(raw, raw.shape[-1])
    out, lad = _run(z, r, z, z, inverse, bound, False)
    return out.view(x.shape), lad.view(x.shape)


def backward(g_out, g_lad, x, raw, inverse, bound):
    z, r = _flat(x), _flat(raw, raw.shape[-1])
    gz, graw = _run(z, r, _flat(g_out), _flat(g_lad), inverse, bound, True)
    return gz.view(x.shape), graw.view(raw.shape)
