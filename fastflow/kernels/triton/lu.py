"""Triton kernels for the LU-parameterised 1x1 convolution / linear map (and fused ActNorm).

Three kernels, float32 arithmetic whatever the storage dtype (float16/bfloat16/float32):

- ``_lu_assemble_kernel`` builds the per-pixel affine map ``A = P L M diag(a)``, ``c = A b``
  from the factors (``L`` unit lower from ``lower``, ``M = triu(upper, 1) + diag(sign*exp(log_s))``,
  rows gathered through ``perm``), one program per block of rows of ``A``.
- ``_lu_apply_kernel`` computes ``y[b, :, p] = A x[b, :, p] + c`` reading and writing NCHW (or
  ``(B, C)``) data in place of any layout copy: the (batch, pixel) pairs are the GEMM's rows, the
  channel stride ``H*W`` is folded into the addresses. Transposed strides of ``A`` give the
  backward ``g_x = A^T g_y`` with the same kernel.
- ``_lu_wgrad_kernel`` reduces ``g_A = sum g_y x^T`` over (batch, pixel) in float32, split over
  programs into partial sums that torch adds up.

The inverse map needs ``W^-1``; it is formed on the host by two triangular solves in float32 (see
:mod:`fastflow.ops.lu`) and applied by ``_lu_apply_kernel``. ``tl.dot`` runs with
``input_precision="ieee"``: TF32 would cost the float32 accuracy the tests hold the kernels to.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels.reference import lu as ref
from fastflow.kernels.torch import lu as tlu
from fastflow.kernels.triton._aot import TRITON_TYPES, Spec, make_spec, ptr, unique

NUM_WARPS = 4


@triton.jit
def _lu_assemble_kernel(
    perm_ptr, lower_ptr, upper_ptr, log_s_ptr, sign_ptr, an_b_ptr, an_ls_ptr, a_ptr, c_ptr, C,
    HAS_AN: tl.constexpr, BR: tl.constexpr, BCOL: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < C
    prow = tl.load(perm_ptr + rows, mask=rmask, other=0)  # row i of W is row perm[i] of L M
    c_acc = tl.zeros((BR,), dtype=tl.float32)
    for j0 in range(0, C, BCOL):
        cols = j0 + tl.arange(0, BCOL)
        cmask = cols < C
        acc = tl.zeros((BR, BCOL), dtype=tl.float32)
        for k0 in range(0, C, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < C
            lt = tl.load(lower_ptr + prow[:, None] * C + ks[None, :],
                         mask=rmask[:, None] & (ks[None, :] < prow[:, None]), other=0.0).to(tl.float32)
            lt = tl.where(ks[None, :] == prow[:, None], 1.0, lt)
            lt = tl.where(rmask[:, None] & kmask[None, :], lt, 0.0)
            ut = tl.load(upper_ptr + ks[:, None] * C + cols[None, :],
                         mask=(ks[:, None] < cols[None, :]) & cmask[None, :], other=0.0).to(tl.float32)
            ls = tl.load(log_s_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            sg = tl.load(sign_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            ut = tl.where((ks[:, None] == cols[None, :]) & cmask[None, :], (sg * tl.exp(ls))[None, :], ut)
            acc += tl.dot(lt, ut, input_precision="ieee")
        if HAS_AN:
            a = tl.exp(tl.load(an_ls_ptr + cols, mask=cmask, other=0.0).to(tl.float32))
            acc = acc * a[None, :]
            b = tl.load(an_b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            c_acc += tl.sum(acc * b[None, :], axis=1)
        tl.store(a_ptr + rows[:, None] * C + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    if HAS_AN:
        tl.store(c_ptr + rows, c_acc, mask=rmask)


@triton.jit
def _lu_apply_kernel(
    x_ptr, a_ptr, c_ptr, y_ptr, NTOT, C, HW, stride_ao, stride_ak,
    HAS_BIAS: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    nmask = n < NTOT
    omask = o < C
    base = (n // HW) * C * HW + (n % HW)  # NCHW address of channel 0 of each (batch, pixel)
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < C
        xt = tl.load(x_ptr + base[:, None] + ks[None, :] * HW, mask=nmask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(a_ptr + o[None, :] * stride_ao + ks[:, None] * stride_ak,
                     mask=kmask[:, None] & omask[None, :], other=0.0)
        acc += tl.dot(xt.to(tl.float32), at, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(c_ptr + o, mask=omask, other=0.0)[None, :]
    tl.store(y_ptr + base[:, None] + o[None, :] * HW, acc.to(y_ptr.dtype.element_ty),
             mask=nmask[:, None] & omask[None, :])


@triton.jit
def _lu_wgrad_kernel(
    g_ptr, x_ptr, part_ptr, NTOT, C, HW, PER_SPLIT,
    BN: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    split = tl.program_id(2)
    omask = o < C
    kmask = ks < C
    acc = tl.zeros((BO, BK), dtype=tl.float32)
    start = split.to(tl.int64) * PER_SPLIT
    for n0 in range(0, PER_SPLIT, BN):
        n = start + n0 + tl.arange(0, BN)
        nmask = (n < NTOT) & (n0 + tl.arange(0, BN) < PER_SPLIT)
        base = (n // HW) * C * HW + (n % HW)
        gt = tl.load(g_ptr + base[:, None] + o[None, :] * HW, mask=nmask[:, None] & omask[None, :], other=0.0)
        xt = tl.load(x_ptr + base[:, None] + ks[None, :] * HW, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(gt.to(tl.float32)), xt.to(tl.float32), input_precision="ieee")
    tl.store(part_ptr + split.to(tl.int64) * C * C + o[:, None] * C + ks[None, :], acc,
             mask=omask[:, None] & kmask[None, :])


def _tile(c: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(c)))


def _canon(v: int) -> int:
    # same JIT typing as v (1 -> constexpr, i32/i64, 16-divisible or not): keeps the cache small
    return 1 if v == 1 else (2**32 if v >= 2**31 else 32) + (0 if v % 16 == 0 else 1)


def lu_spec(kernel_name: str, c: int, dtype: torch.dtype = torch.float32, has_extra: bool = False,
            ints: dict | None = None) -> Spec:
    """The specialisation the launcher of ``kernel_name`` (``assemble``, ``apply``, ``wgrad``)
    launches for ``C = c`` channels and storage ``dtype`` (``has_extra``: ActNorm folded in for
    ``assemble``, a bias for ``apply``); ``ints`` are the integer arguments' values."""
    key = tuple(sorted((k, _canon(int(v))) for k, v in (ints or {}).items()))
    return _lu_spec(kernel_name, c, dtype, bool(has_extra), key)


@functools.lru_cache(maxsize=1024)
def _lu_spec(kernel_name, c, dtype, has_extra, ints) -> Spec:
    f32 = ptr(torch.float32)
    ints = dict(ints)
    if kernel_name == "assemble":
        kernel = _lu_assemble_kernel
        types = dict(perm_ptr="*i64", lower_ptr=ptr(dtype), upper_ptr=ptr(dtype), log_s_ptr=ptr(dtype),
                     sign_ptr=ptr(dtype), an_b_ptr=ptr(dtype), an_ls_ptr=ptr(dtype), a_ptr=f32, c_ptr=f32)
        cx = dict(HAS_AN=has_extra, BR=16, BCOL=_tile(c, 64), BK=_tile(c, 32))
    elif kernel_name == "apply":
        kernel = _lu_apply_kernel
        types = dict(x_ptr=ptr(dtype), a_ptr=f32, c_ptr=f32, y_ptr=ptr(dtype))
        cx = dict(HAS_BIAS=has_extra, BN=64, BO=_tile(c, 64), BK=_tile(c, 32))
    else:
        kernel = _lu_wgrad_kernel
        types = dict(g_ptr=ptr(dtype), x_ptr=ptr(dtype), part_ptr=f32)
        cx = dict(BN=64, BO=_tile(c, 32), BK=_tile(c, 32))
    label = f"lu {kernel_name}{' +' if has_extra else ''} C={c} {TRITON_TYPES[dtype]}"
    return make_spec(kernel, types, cx, NUM_WARPS, label, ints=ints)


def specializations() -> list[Spec]:
    """The distinct specialisations the ahead-of-time compile covers: every tile size the
    launchers choose (C = 8, 24, 48, 96: tiles 16, 32, 64 and a ragged edge), every storage
    dtype the LU ops take at C = 48, with and without ActNorm/bias, for (B, C, 32x32) images."""
    out = []
    hw, b = 1024, 64
    for c in (8, 24, 48, 96):
        for dtype in (torch.float32, torch.float16, torch.bfloat16) if c == 48 else (torch.float32,):
            for extra in (False, True):
                out.append(lu_spec("assemble", c, dtype, extra, dict(C=c)))
                out.append(lu_spec("apply", c, dtype, extra, dict(NTOT=b * hw, C=c, HW=hw, stride_ao=c, stride_ak=1)))
            # the backward applies A^T: transposed strides
            out.append(lu_spec("apply", c, dtype, False, dict(NTOT=b * hw, C=c, HW=hw, stride_ao=1, stride_ak=c)))
            out.append(lu_spec("wgrad", c, dtype, False, dict(NTOT=b * hw, C=c, HW=hw, PER_SPLIT=b * hw // 8)))
    return unique(out)


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.is_cuda else _nullctx()


def assemble(perm, lower, upper, log_s, sign, an_bias=None, an_logscale=None):
    """Launcher: ``A (C, C)`` float32 and ``c (C,)`` float32 (None without ActNorm)."""
    c = lower.shape[0]
    a_mat = torch.empty((c, c), dtype=torch.float32, device=lower.device)
    has_an = an_logscale is not None
    bias = torch.empty((c,), dtype=torch.float32, device=lower.device) if has_an else a_mat
    spec = lu_spec("assemble", c, lower.dtype, has_an, dict(C=c))
    with _device_ctx(lower):
        _lu_assemble_kernel[(triton.cdiv(c, dict(spec.constexprs)["BR"]),)](
            perm.contiguous(), lower.contiguous(), upper.contiguous(), log_s.contiguous(), sign.contiguous(),
            an_bias.contiguous() if has_an else log_s, an_logscale.contiguous() if has_an else log_s,
            a_mat, bias, c, **spec.launch_kwargs(),
        )
    return a_mat, (bias if has_an else None)


def apply(x3, a_mat, bias=None, transpose=False):
    """Launcher: ``y3[b, :, n] = A x3[b, :, n] + c`` (``A^T`` if ``transpose``), ``x3 (B, C, N)``
    contiguous in any float dtype, ``A``/``c`` float32; ``y3`` has ``x3``'s dtype."""
    b, c, hw = x3.shape
    y3 = torch.empty_like(x3)
    ntot = b * hw
    if ntot == 0:
        return y3
    s_o, s_k = a_mat.stride()
    if transpose:
        s_o, s_k = s_k, s_o
    spec = lu_spec("apply", c, x3.dtype, bias is not None, dict(NTOT=ntot, C=c, HW=hw, stride_ao=s_o, stride_ak=s_k))
    cx = dict(spec.constexprs)
    grid = (triton.cdiv(ntot, cx["BN"]), triton.cdiv(c, cx["BO"]))
    with _device_ctx(x3):
        _lu_apply_kernel[grid](
            x3, a_mat, bias if bias is not None else a_mat, y3, ntot, c, hw, s_o, s_k, **spec.launch_kwargs(),
        )
    return y3


def wgrad(g3, x3):
    """Launcher: ``sum_{b,n} g3[b,:,n] x3[b,:,n]^T`` ``(C, C)`` float32; both ``(B, C, N)`` contiguous."""
    b, c, hw = x3.shape
    ntot = b * hw
    cx = dict(lu_spec("wgrad", c, x3.dtype, False, dict(NTOT=ntot, C=c, HW=hw, PER_SPLIT=64)).constexprs)
    bn, bo, bk = cx["BN"], cx["BO"], cx["BK"]  # the tile does not depend on PER_SPLIT
    tiles = triton.cdiv(c, bo) * triton.cdiv(c, bk)
    # Enough programs to fill a GPU (~4 per SM) without partial buffers dwarfing C x C.
    splits = max(1, min(triton.cdiv(ntot, 4 * bn), triton.cdiv(512, tiles)))
    per_split = triton.cdiv(triton.cdiv(ntot, splits), bn) * bn
    splits = max(1, triton.cdiv(ntot, per_split))
    part = torch.empty((splits, c, c), dtype=torch.float32, device=x3.device)
    if ntot == 0:
        return torch.zeros((c, c), dtype=torch.float32, device=x3.device)
    spec = lu_spec("wgrad", c, x3.dtype, False, dict(NTOT=ntot, C=c, HW=hw, PER_SPLIT=per_split))
    with _device_ctx(x3):
        _lu_wgrad_kernel[(triton.cdiv(c, bo), triton.cdiv(c, bk), splits)](
            g3, x3, part, ntot, c, hw, per_split, **spec.launch_kwargs(),
        )
    return part.sum(0)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------
# The launcher interface of kernels/<backend>/lu.py (see kernels/reference/lu.py).
# --------------------------------------------------------------------------------------------


def _coefficients(an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    if not inverse:
        return assemble(perm, lower, upper, log_s, sign, an_b, an_ls)
    # W^-1 by two float32 triangular solves on the host side, once per call (documented).
    v = tlu.inverse_matrix(perm, lower, upper, log_s, sign, torch.float32)
    an_b, an_ls = (None if t is None else t.float() for t in (an_b, an_ls))
    return ref.coefficients(perm, lower, upper, log_s, sign, an_b, an_ls, inverse=True, inv_weight=v)


def forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    a_mat, bias = _coefficients(an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    return apply(x3.contiguous(), a_mat, bias)


def backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params):
    a_mat, _ = _coefficients(an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    g3 = g3.contiguous()
    g_x3 = apply(g3, a_mat, None, transpose=True)
    if not need_params:
        return g_x3, None, None, None, None, None
    x3 = x3.contiguous()
    g_a = wgrad(g3, x3)
    g_c = g3.sum(dim=(0, 2), dtype=torch.float32)
    p = [None if t is None else t.float() for t in (lower, upper, log_s, sign, an_b, an_ls)]
    grads = ref.parameter_grads(g_a, g_c, g_lad_sum.float(), x3.shape[2], perm, *p, inverse=inverse, a_mat=a_mat)
    return (g_x3, *grads)
