"""CUDA launchers of the coupling kernels (``csrc/coupling.cu``).

Same interface as the numba launchers in :mod:`fastflow.kernels.numba.coupling`, on torch
tensors: inputs are ``(B, M, N)`` strided views of one dtype (float32/float16/bfloat16) on one
CUDA device, passed by pointer and element strides (no copies); outputs are new contiguous
``(B, M, N)`` tensors and a ``(B,)`` log-det.
"""

from __future__ import annotations

import numpy as np
import torch

from fastflow.kernels.cuda.loader import BLOCK, dtype_suffix, launch, ptr

OP = "coupling"
_KINDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}
# Rows at least this long get a whole block each (a warp each otherwise): enough threads per
# row to stream it, without leaving 7 of 8 warps idle on short rows.
_BLOCK_ROW_MIN = 2048


def _strided(t: torch.Tensor, like: torch.Tensor, name: str):
    if t.dim() != 3 or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"cuda coupling: {name} must be a (B, M, N) view like x {tuple(like.shape)} {like.dtype} on "
            f"{like.device}, got {tuple(t.shape)} {t.dtype} {t.device}"
        )
    return (ptr(t), *(np.int64(s) for s in t.stride()))


def _shape(x: torch.Tensor):
    if x.dim() != 3:
        raise ValueError(f"cuda coupling: x must be a (B, M, N) tensor, got {tuple(x.shape)}")
    b, m, n = x.shape
    rt = BLOCK if m * n >= _BLOCK_ROW_MIN else 32
    grid = (b + BLOCK // rt - 1) // (BLOCK // rt)
    return b, m, n, rt, grid


def _kind(scale: str) -> np.int32:
    try:
        return np.int32(_KINDS[scale])
    except KeyError:
        raise ValueError(f"cuda coupling: unknown scale {scale!r}; expected one of {sorted(_KINDS)}") from None


def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    """``x, shift, raw_scale (B, M, N)`` -> ``(out (B, M, N), lad (B,))``."""
    b, m, n, rt, grid = _shape(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lad = torch.empty(b, dtype=x.dtype, device=x.device)
    if b:
        args = (*_strided(x, x, "x"), *_strided(shift, x, "shift"), *_strided(raw_scale, x, "raw_scale"),
                ptr(out), ptr(lad), np.int64(b), np.int64(m), np.int64(n), _kind(scale), np.float32(clamp),
                np.int32(bool(inverse)), np.int32(rt))
        launch(OP, f"affine_fwd_{dtype_suffix(x.dtype)}", x.device, b, args, grid=grid)
    return out, lad


def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    """Fused backward: ``(grad x, grad raw_scale)``, contiguous ``(B, M, N)``."""
    b, m, n, rt, grid = _shape(x)
    if g_lad.dim() != 1 or g_lad.shape[0] != b or g_lad.dtype != x.dtype or g_lad.device != x.device:
        raise ValueError(f"cuda coupling: g_lad must be ({b},) {x.dtype} on {x.device}, got {tuple(g_lad.shape)}")
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gh = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if b and m * n:
        args = (*_strided(g_out, x, "g_out"), ptr(g_lad), np.int64(g_lad.stride(0)), *_strided(x, x, "x"),
                *_strided(shift, x, "shift"), *_strided(raw_scale, x, "raw_scale"), ptr(gx), ptr(gh),
                np.int64(b), np.int64(m), np.int64(n), _kind(scale), np.float32(clamp), np.int32(bool(inverse)),
                np.int32(rt))
        launch(OP, f"affine_bwd_{dtype_suffix(x.dtype)}", x.device, b, args, grid=grid)
    return gx, gh


def additive_fwd(x, shift, inverse):
    """``x, shift (B, M, N)`` -> ``out (B, M, N)`` (the log-det is zero; the op fills it)."""
    b, m, n, rt, grid = _shape(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if b and m * n:
        args = (*_strided(x, x, "x"), *_strided(shift, x, "shift"), ptr(out), np.int64(b), np.int64(m),
                np.int64(n), np.int32(bool(inverse)), np.int32(rt))
        launch(OP, f"additive_fwd_{dtype_suffix(x.dtype)}", x.device, b, args, grid=grid)
    return out
