"""Triton kernels for the affine/additive coupling laws and NICE's scaling layer.

Every input is a ``(B, M, N)`` strided view (a channel half, an interleaved column): element
``f = m*N + n`` of row ``b`` is read at ``b*sb + m*sm + n*sn``, so no input is ever copied.
A program takes ``ROWS`` rows and walks the ``F = M*N`` event elements in ``BLOCK``-wide tiles,
keeping the per-sample log-det in registers (one program owns a row: no atomics, deterministic).
float16/bfloat16/float32 storage computed in float32; float64 storage computed in float64.
Every launcher takes its constexprs and ``num_warps`` from a ``*_spec`` function, which the
ahead-of-time compile test and ``fastflow bench gpu-model`` read too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels.triton._aot import TRITON_TYPES, Spec, f64, make_spec, ptr, unique

_KINDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}
NUM_WARPS = 4


@triton.jit
def _ct(v, F64: tl.constexpr):
    """``v`` in the compute dtype: float64 for float64 storage, float32 otherwise (tl.cast, not
    .to: the interpreter passes scalar arguments as Python floats)."""
    if F64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def _scale_terms(h, KIND: tl.constexpr, clamp):
    """(log s, s, 1/s, d log s / dh) of the raw scale h (in h's compute dtype)."""
    if KIND == 0:
        logs = h
        s = tl.exp(h)
        inv_s = tl.exp(-h)
        d = tl.full(h.shape, 1.0, h.dtype)
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
        # log1p(e) without a libdevice call, to a few ulps in either dtype: log(u) e / (u - 1)
        # with u = 1 + e rounded (Goldberg's identity).
        lp = tl.where(den == 1.0, e, tl.log(den) * (e / (den - 1.0)))
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
    xsb, xsm, xsn, tsb, tsm, tsn, hsb, hsm, hsn, clamp_: tl.float64,
    KIND: tl.constexpr, INVERSE: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    clamp = _ct(clamp_, F64)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    acc = _ct(tl.zeros((ROWS, BLOCK), tl.float32), F64)
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        x = _ct(tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0), F64)
        t = _ct(tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0), F64)
        h = _ct(tl.load(h_ptr + _offsets(rows, f, N, hsb, hsm, hsn), mask=mask, other=0.0), F64)
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
    gsb, gsm, gsn, glsb, xsb, xsm, xsn, tsb, tsm, tsn, hsb, hsm, hsn, clamp_: tl.float64,
    KIND: tl.constexpr, INVERSE: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    clamp = _ct(clamp_, F64)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    gl = _ct(tl.load(gl_ptr + rows * glsb, mask=rmask, other=0.0), F64)
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        g = _ct(tl.load(go_ptr + _offsets(rows, f, N, gsb, gsm, gsn), mask=mask, other=0.0), F64)
        x = _ct(tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0), F64)
        h = _ct(tl.load(h_ptr + _offsets(rows, f, N, hsb, hsm, hsn), mask=mask, other=0.0), F64)
        logs, s, inv_s, d = _scale_terms(h, KIND, clamp)
        if INVERSE:
            t = _ct(tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0), F64)
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
    INVERSE: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = rmask[:, None] & (f < F)[None, :]
        x = _ct(tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0), F64)
        t = _ct(tl.load(t_ptr + _offsets(rows, f, N, tsb, tsm, tsn), mask=mask, other=0.0), F64)
        out = x - t if INVERSE else x + t
        tl.store(out_ptr + rows[:, None] * F + f[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rescale_kernel(
    go_ptr, x_ptr, ls_ptr, out_ptr, part_ptr, B, F, N, gsb, gsm, gsn, xsb, xsm, xsn, lsm, lsn, sign_: tl.float64,
    BACKWARD: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Forward: out = x * exp(sign*ls). Backward: out = go * exp(sign*ls) (grad x) and
    part[pid_rows, f] = sum over this program's rows of go * x * exp(sign*ls) (float32, or
    float64 for float64 storage)."""
    sign = _ct(sign_, F64)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    f = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    fmask = f < F
    mask = rmask[:, None] & fmask
    ls = _ct(tl.load(ls_ptr + (f // N) * lsm + (f % N) * lsn, mask=fmask, other=0.0), F64)
    e = tl.exp(sign * ls)[None, :]
    x = _ct(tl.load(x_ptr + _offsets(rows, f, N, xsb, xsm, xsn), mask=mask, other=0.0), F64)
    o = rows[:, None] * F + f[None, :]
    if BACKWARD:
        g = _ct(tl.load(go_ptr + _offsets(rows, f, N, gsb, gsm, gsn), mask=mask, other=0.0), F64)
        tl.store(out_ptr + o, (g * e).to(out_ptr.dtype.element_ty), mask=mask)
        part = tl.sum(tl.where(mask, g * x * e, 0.0), axis=0)
        tl.store(part_ptr + tl.program_id(0) * F + f, part.to(part_ptr.dtype.element_ty), mask=fmask)
    else:
        tl.store(out_ptr + o, (x * e).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers: (B, M, N) strided tensors in, contiguous tensors out.
# --------------------------------------------------------------------------------------------


# Tile entries per 4-warp program: 8 per thread (float64: 4). At 4096 (32 per thread, the first
# version) the sm_90 compile used 100-255 registers and float64 spilled up to 1.6 KB a thread
# (``fastflow bench gpu-model``); the loop over F keeps every element's work the same.
_TILE = 1024


def _cfg(f: int, f64: bool = False):
    tile = _TILE // 2 if f64 else _TILE
    block = min(tile, triton.next_power_of_2(max(f, 16)))
    rows = max(1, min(64, tile // block))
    return rows, block


def _canon(v: int) -> int:
    """A stand-in for an integer argument with the same JIT typing (1, i32 or i64, 16-divisible
    or not), so that the specs' cache does not grow with every batch size and stride."""
    if v == 1:
        return 1
    return (2**32 if v >= 2**31 else 32) + (0 if v % 16 == 0 else 1)


def coupling_spec(kernel_name: str, dtype: torch.dtype, b: int, m: int, n: int, strides: tuple, kind=None,
                  inverse=False, backward=False) -> Spec:
    """The specialisation a coupling launcher launches for ``(B, M, N)`` inputs of ``dtype`` whose
    strides are ``strides`` (one ``(sb, sm, sn)`` per strided input, in argument order; a bare
    int for ``g_lad``'s): its constexprs, ``num_warps``, and the integer arguments typed as the
    JIT types them (a stride of 1 becomes a constexpr: it is part of the specialisation)."""
    canon = tuple(_canon(v) if isinstance(v, int) else tuple(_canon(x) for x in v) for v in strides)
    return _coupling_spec(kernel_name, dtype, _canon(b), m, n, canon, kind, bool(inverse), bool(backward))


_STRIDES = ("sb", "sm", "sn")


def _stride_ints(prefixes, strides):
    return {p + s: v for p, st in zip(prefixes, strides) for s, v in zip(_STRIDES, st)}


@functools.lru_cache(maxsize=4096)
def _coupling_spec(kernel_name, dtype, b, m, n, strides, kind, inverse, backward) -> Spec:
    f = m * n
    if kernel_name == "rescale":
        kernel = _rescale_kernel
        tile = _TILE // 2 if dtype == torch.float64 else _TILE
        block = min(256, triton.next_power_of_2(max(f, 16)))
        rows = max(1, min(64, tile // block))
        cx = dict(BACKWARD=bool(backward), F64=dtype == torch.float64, ROWS=rows, BLOCK=block)
        (gs, xs, ls) = strides  # inverse is the runtime sign here
        ints = dict(B=b, F=_canon(f), N=_canon(n), **_stride_ints(("g", "x"), (gs, xs)), lsm=ls[0], lsn=ls[1])
        types = {a: ptr(dtype) for a in ("go_ptr", "x_ptr", "ls_ptr", "out_ptr")}
        types.update(part_ptr=ptr(torch.float64 if dtype == torch.float64 else torch.float32), sign_="fp64")
        label = f"rescale {'bwd' if backward else 'fwd'} {TRITON_TYPES[dtype]} F={f}"
        return make_spec(kernel, types, cx, NUM_WARPS, label, ints=ints)
    f64 = dtype == torch.float64
    rows, block = _cfg(f, f64)
    if kernel_name == "additive_fwd":
        kernel = _additive_fwd_kernel
        cx = dict(INVERSE=bool(inverse), F64=f64, ROWS=rows, BLOCK=block)
        ints = dict(B=b, F=_canon(f), N=_canon(n), **_stride_ints(("x", "t"), strides))
        types = {a: ptr(dtype) for a in kernel.arg_names if a.endswith("_ptr")}
        return make_spec(kernel, types, cx, NUM_WARPS, f"additive {TRITON_TYPES[dtype]} F={f}", ints=ints)
    kernel = _affine_bwd_kernel if kernel_name == "affine_bwd" else _affine_fwd_kernel
    cx = dict(KIND=_KINDS[kind], INVERSE=bool(inverse), F64=f64, ROWS=rows, BLOCK=block)
    types = {a: ptr(dtype) for a in kernel.arg_names if a.endswith("_ptr")}
    types["clamp_"] = "fp64"
    if kernel_name == "affine_bwd":
        gs, glsb, *rest = strides
        ints = dict(B=b, F=_canon(f), N=_canon(n), **_stride_ints(("g", "x", "t", "h"), (gs, *rest)), glsb=glsb)
    else:
        ints = dict(B=b, F=_canon(f), N=_canon(n), **_stride_ints(("x", "t", "h"), strides))
    label = f"affine {kernel_name[-3:]} {kind}{' inverse' if inverse else ''} {TRITON_TYPES[dtype]} F={f}"
    return make_spec(kernel, types, cx, NUM_WARPS, label, ints=ints)


def specializations() -> list[Spec]:
    """The distinct specialisations the ahead-of-time compile covers. Contiguous inputs from a
    conditioner of 2**20 rows: every law x direction x storage dtype at F = 3072 (a 3x32x32
    channel half, the launchers' widest tile) and every tile width (F = 16..1024) in float32;
    then the strided views the ops pass (a channel half, an interleaved column: no stride 1)."""
    b = 2**20
    out = []

    def contiguous(f, count):
        return ((f, f, 1),) * count

    for dtype in TRITON_TYPES:
        for f in (3072,) if dtype != torch.float32 else (3072, 16, 32, 64, 128, 256, 512, 1024, 17):
            kinds = _KINDS if dtype != torch.float32 or f == 3072 else ("exp",)
            for kind in kinds:
                for inverse in (False, True):
                    out.append(coupling_spec("affine_fwd", dtype, b, 1, f, contiguous(f, 3), kind, inverse))
                    out.append(coupling_spec("affine_bwd", dtype, b, 1, f, contiguous(f, 1) + (1,) + contiguous(f, 3),
                                             kind, inverse))
            for inverse in (False, True):
                out.append(coupling_spec("additive_fwd", dtype, b, 1, f, contiguous(f, 2), None, inverse))
                out.append(coupling_spec("rescale", dtype, b, 1, f, contiguous(f, 2) + ((f, 1),), None, False, inverse))
    # strided: x[:, :C//2] of a (B, 2C, H, W) tensor and h[:, ::2] (an interleaved view)
    c, hw = 3, 1024
    half, inter = (2 * c * hw, hw, 1), (2 * c * hw, 2 * hw, 1)
    for dtype in (torch.float32, torch.float64):
        out.append(coupling_spec("affine_fwd", dtype, b, c, hw, (half, half, inter), "softclamp", False))
        out.append(coupling_spec("affine_bwd", dtype, b, c, hw, ((c * hw, hw, 1), 1, half, half, inter),
                                 "softclamp", False))
    return unique(out)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else _nullctx()


def _launch(spec: Spec, grid, args):
    """Launch with the spec's constexprs; integer arguments the spec made constexpr (a stride of
    1) are passed by value as the JIT expects, so the launch compiles the same specialisation."""
    with _device(args[0]):
        spec.kernel[grid](*args, **spec.launch_kwargs())


def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    """``x, shift, raw_scale (B, M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    b, m, n = x.shape
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    lad = torch.empty(b, dtype=x.dtype, device=x.device)
    spec = coupling_spec("affine_fwd", x.dtype, b, m, n, (x.stride(), shift.stride(), raw_scale.stride()),
                         scale, bool(inverse))
    grid = (triton.cdiv(b, dict(spec.constexprs)["ROWS"]),)
    _launch(spec, grid, (x, shift, raw_scale, out, lad, b, m * n, n, *x.stride(), *shift.stride(),
                         *raw_scale.stride(), f64(clamp)))
    return out, lad


def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    """Fused backward: ``(grad x, grad raw_scale)``, contiguous ``(B, M, N)``."""
    b, m, n = x.shape
    gx = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    gh = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    spec = coupling_spec("affine_bwd", x.dtype, b, m, n, (g_out.stride(), g_lad.stride(0), x.stride(), shift.stride(),
                                                          raw_scale.stride()), scale, bool(inverse))
    grid = (triton.cdiv(b, dict(spec.constexprs)["ROWS"]),)
    _launch(spec, grid, (g_out, g_lad, x, shift, raw_scale, gx, gh, b, m * n, n, *g_out.stride(), g_lad.stride(0),
                         *x.stride(), *shift.stride(), *raw_scale.stride(), f64(clamp)))
    return gx, gh


def additive_fwd(x, shift, inverse):
    b, m, n = x.shape
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    spec = coupling_spec("additive_fwd", x.dtype, b, m, n, (x.stride(), shift.stride()), None, bool(inverse))
    grid = (triton.cdiv(b, dict(spec.constexprs)["ROWS"]),)
    _launch(spec, grid, (x, shift, out, b, m * n, n, *x.stride(), *shift.stride()))
    return out


def _rescale_launch(g_out, x, log_scale, inverse, backward):
    b, m, n = x.shape
    f = m * n
    go = g_out if backward else x
    spec = coupling_spec("rescale", x.dtype, b, m, n, (go.stride(), x.stride(), log_scale.stride()), None,
                         False, bool(backward))
    cx = dict(spec.constexprs)
    grid = (triton.cdiv(b, cx["ROWS"]), triton.cdiv(f, cx["BLOCK"]))
    out = torch.empty((b, m, n), dtype=x.dtype, device=x.device)
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((grid[0], f) if backward else (1,), dtype=part_dtype, device=x.device)
    _launch(spec, grid, (go, x, log_scale, out, part, b, f, n, *go.stride(), *x.stride(), *log_scale.stride(),
                         -1.0 if inverse else 1.0))
    return out, part


def rescale_fwd(x, log_scale, inverse):
    """``x (B, M, N)``, ``log_scale (M, N)`` strided -> ``(out (B, M, N), lad (B,))``."""
    out, _ = _rescale_launch(None, x, log_scale, inverse, False)
    total = log_scale.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    lad = (-total if inverse else total).to(x.dtype).expand(x.shape[0]).clone()
    return out, lad


def rescale_bwd(g_out, g_lad, x, log_scale, inverse):
    """``(grad x (B, M, N), grad log_scale (M, N))``."""
    gx, part = _rescale_launch(g_out, x, log_scale, inverse, True)
    sign = -1.0 if inverse else 1.0
    g_ls = sign * (part.sum(0) + g_lad.sum(dtype=part.dtype))
    return gx, g_ls.view(log_scale.shape).to(x.dtype)
