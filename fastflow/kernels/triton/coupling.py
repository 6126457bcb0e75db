"""Triton kernels for the affine/additive coupling laws and NICE's scaling layer.

Every input is a ``(B, M, N)`` strided view (a channel half, an interleaved column): element
``f = m*N + n`` of row ``b`` is read at ``b*sb + m*sm + n*sn``, so no input is ever copied.
A program takes ``ROWS`` rows and walks the ``F = M*N`` event elements in ``BLOCK``-wide tiles,
keeping the per-sample log-det in registers (one program owns a row: no atomics, deterministic).
float16/bfloat16/float32 storage, float32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_KINDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}


@triton.jit
def _scale_terms(h, KIND: tl.constexpr, clamp):
    """(log s, s, 1/s, d log s / dh) of the raw scale h (float32)."""
    if KIND == 0:
        logs = h
        s = tl.exp(h)
        inv_s = tl.exp(-h)
        d = tl.full(h.shape, 1.0, tl.float32)
    elif KIND == 1:
        a = h / clamp
        e = tl.exp(-2.0 * tl.abs(a))
        r = (1.0 - e) / (1.0 + e)
        u = tl.where(a >= 0, r, -r)
        logs = clamp * u
        s = tl.exp(logs)
        inv_s = tl.exp(-logs)
        d = 1.0 - u * u
    else:
        z = h + 2.0
        e = tl.exp(-tl.abs(z))
        den = 1.0 + e
        # log1p(e) without a libdevice call: for small e the series is exact to fp32.
        lp = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(den))
        pos = z >= 0
        logs = tl.where(pos, -lp, z - lp)
        s = tl.where(pos, 1.0 / den, e / den)
        inv_s = tl.where(pos, den, 1.0 + tl.exp(-z))
        d = tl.where(pos, e / den, 1.0 / den)
    return logs, s, inv_s, d


@triton.jit
def _offsets(rows, f, N, sb, sm, sn):
    return rows[:, None] * sb + (f // N)[None, :] * sm + (f % N)[None, :] * sn


@triton.jit
def _affine_fwd_kernel(
    x_ptr, t_ptr, h_ptr, out_ptr, lad_ptr, B, F, N,
    xsb, xsm, xsn, tsb, tsm, tsn, hsb, hsm, hsn, clamp,
    KIND: tl.constexpr, INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    acc = tl.zeros((ROWS, BLOCK), tl.float32)
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        x = tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + _offsets(rows, f, N, hsb, hsm, hsn), mask=mask, other=0.0).to(tl.float32)
        logs, s, inv_s, d = _scale_terms(h, KIND, clamp)
        if INVERSE:
            out = (x - t) * inv_s
        else:
            out = x * s + t
        tl.store(out_ptr + rows[:, None] * F + f[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, logs, 0.0)
    lad = tl.sum(acc, axis=1)
    if INVERSE:
        lad = -lad
    tl.store(lad_ptr + rows, lad.to(lad_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _affine_bwd_kernel(
    go_ptr, gl_ptr, x_ptr, t_ptr, h_ptr, gx_ptr, gh_ptr, B, F, N,
    gsb, gsm, gsn, glsb, xsb, xsm, xsn, tsb, tsm, tsn, hsb, hsm, hsn, clamp,
    KIND: tl.constexpr, INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    gl = tl.load(gl_ptr + rows * glsb, mask=rmask, other=0.0).to(tl.float32)
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        g = tl.load(go_ptr + _offsets(rows, f, N, gsb, gsm, gsn), mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + _offsets(rows, f, N, hsb, hsm, hsn), mask=mask, other=0.0).to(tl.float32)
        logs, s, inv_s, d = _scale_terms(h, KIND, clamp)
        if INVERSE:
            t = tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0).to(tl.float32)
            xi = (x - t) * inv_s
            gx = g * inv_s
            gh = -(g * xi + gl[:, None]) * d
        else:
            gx = g * s
            gh = (g * x * s + gl[:, None]) * d
        o = rows[:, None] * F + f[None, :]
        tl.store(gx_ptr + o, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gh_ptr + o, gh.to(gh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _additive_fwd_kernel(
    x_ptr, t_ptr, out_ptr, B, F, N, xsb, xsm, xsn, tsb, tsm, tsn,
    INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        x = tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0).to(tl.float32)
        out = x - t if INVERSE else x + t
        tl.store(out_ptr + rows[:, None] * F + f[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rescale_kernel(
    go_ptr, x_ptr, ls_ptr, out_ptr, part_ptr, B, F, N, gsb, gsm, gsn, xsb, xsm, xsn, lsm, lsn, sign,
    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Forward: out = x * exp(sign*ls). Backward: out = go * exp(sign*ls) (grad x) and
    part[pid_rows, f] = sum over this program's rows of go * x * exp(sign*ls)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    f = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    fmask = f < F
    mask = rmask[:, None] & fmask
    ls = tl.load(ls_ptr + (f // N) * lsm + (f % N) * lsn, mask=fmask, other=0.0).to(tl.float32)
    e = tl.exp(sign * ls)[None, :]
    x = tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0).to(tl.float32)
    o = rows[:, None] * F + f[None, :]
    if BACKWARD:
        g = tl.load(go_ptr + _offsets(rows, f, N, gsb, gsm, gsn), mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o, (g * e).to(out_ptr.dtype.element_ty), mask=mask)
        part = tl.sum(tl.where(mask, g * x * e, 0.0), axis=0)
        tl.store(part_ptr + tl.program_id(0) * F + f, part, mask=fmask)
    else:
        tl.store(out_ptr + o, (x * e).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers: (B, M, N) strided tensors in, contiguous tensors out.
# --------------------------------------------------------------------------------------------


def _cfg(b: int, f: int):
    block = min(1024, triton.next_power_of_2(max(f, 16)))
    rows = max(1, min(64, 4096 // block))
    return rows, block, (triton.cdiv(b, rows),)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else _nullctx()


def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    """``x, shift, raw_scale (B, M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    b, m, n = x.shape
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    lad = torch.empty(b, dtype=x.dtype, device=x.device)
    rows, block, grid = _cfg(b, m * n)
    with _device(x):
        _affine_fwd_kernel[grid](
            x, shift, raw_scale, out, lad, b, m * n, n, *x.stride(), *shift.stride(), *raw_scale.stride(),
            float(clamp), KIND=_KINDS[scale], INVERSE=bool(inverse), ROWS=rows, BLOCK=block,
        )
    return out, lad


def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    """Fused backward: ``(grad x, grad raw_scale)``, contiguous ``(B, M, N)``."""
    b, m, n = x.shape
    gx = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    gh = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    rows, block, grid = _cfg(b, m * n)
    with _device(x):
        _affine_bwd_kernel[grid](
            g_out, g_lad, x, shift, raw_scale, gx, gh, b, m * n, n, *g_out.stride(), g_lad.stride(0),
            *x.stride(), *shift.stride(), *raw_scale.stride(), float(clamp),
            KIND=_KINDS[scale], INVERSE=bool(inverse), ROWS=rows, BLOCK=block,
        )
    return gx, gh


def additive_fwd(x, shift, inverse):
    b, m, n = x.shape
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    rows, block, grid = _cfg(b, m * n)
    with _device(x):
        _additive_fwd_kernel[grid](x, shift, out, b, m * n, n, *x.stride(), *shift.stride(),
                                   INVERSE=bool(inverse), ROWS=rows, BLOCK=block)
    return out


def _rescale_launch(g_out, x, log_scale, inverse, backward):
    b, m, n = x.shape
    f = m * n
    block = min(256, triton.next_power_of_2(max(f, 16)))
    rows = 64
    grid = (triton.cdiv(b, rows), triton.cdiv(f, block))
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((grid[0], f) if backward else (1,), dtype=torch.float32, device=x.device)
    go = g_out if backward else x
    with _device(x):
        _rescale_kernel[grid](
            go, x, log_scale, out, part, b, f, n, *go.stride(), *x.stride(), *log_scale.stride(),
            -1.0 if inverse else 1.0, BACKWARD=bool(backward), ROWS=rows, BLOCK=block,
        )
    return out, part


def rescale_fwd(x, log_scale, inverse):
    """``x (B, M, N)``, ``log_scale (M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    out, _ = _rescale_launch(None, x, log_scale, inverse, False)
    total = log_scale.sum(dtype=torch.float32)
    lad = (-total if inverse else total).to(x.dtype).expand(x.shape[0]).clone()
    return out, lad


def rescale_bwd(g_out, g_lad, x, log_scale, inverse):
    """``(grad x (B, M, N), grad log_scale (M, N))``."""
    gx, part = _rescale_launch(g_out, x, log_scale, inverse, True)
    sign = -1.0 if inverse else 1.0
    g_ls = sign * (part.sum(0) + g_lad.sum(dtype=torch.float32))
    return gx, g_ls.view(log_scale.shape).to(x.dtype)
