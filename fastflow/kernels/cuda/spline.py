"""CUDA launchers of the rational-quadratic spline kernels (``csrc/rq_spline.cu``).

Same signatures as :mod:`fastflow.kernels.triton.spline`: ``fwd``/``bwd`` take flat contiguous
tensors of one dtype (float32/float16/bfloat16) on one CUDA device and return new tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from fastflow.kernels.cuda import BACKEND
from fastflow.kernels.reference.spline import flat_rows
from fastflow.kernels.cuda.loader import dtype_suffix, launch, ptr

OP = "rq_spline"


def _check(x, uw, uh, ud):
    # The kernels index rows as contiguous memory: refuse anything else rather than read wrong.
    n, k = uw.shape
    shapes = {"x": (x, (n,)), "uw": (uw, (n, k)), "uh": (uh, (n, k)), "ud": (ud, (n, k - 1))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape or not t.is_contiguous() or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"cuda rq_spline: {name} must be contiguous with shape {shape}, dtype {x.dtype} on {x.device}; "
                f"got shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, contiguous={t.is_contiguous()}"
            )
    return n, k


def _scalars(n, k, tb, mbw, mbh, md, inverse):
    return (np.int64(n), np.int64(k), np.float32(tb), np.float32(mbw), np.float32(mbh), np.float32(md),
            np.int32(bool(inverse)))


def fwd(x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher. ``x (N,)``, ``uw, uh (N, K)``, ``ud (N, K-1)``: contiguous, one dtype/device."""
    n, k = _check(x, uw, uh, ud)
    out = torch.empty_like(x)
    lad = torch.empty_like(x)
    if n:
        launch(OP, f"rq_spline_fwd_{dtype_suffix(x.dtype)}", x.device, n,
               (ptr(x), ptr(uw), ptr(uh), ptr(ud), ptr(out), ptr(lad), *_scalars(n, k, tb, mbw, mbh, md, inverse)))
    return out, lad


def bwd(g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
    """Launcher of the fused backward: gradients for ``x, uw, uh, ud``."""
    n, k = _check(x, uw, uh, ud)
    for name, g in (("g_out", g_out), ("g_lad", g_lad)):
        if tuple(g.shape) != (n,) or not g.is_contiguous() or g.dtype != x.dtype or g.device != x.device:
            raise ValueError(f"cuda rq_spline: {name} must be contiguous ({n},) {x.dtype} on {x.device}, "
                             f"got {tuple(g.shape)} {g.dtype} {g.device}")
    g_x = torch.empty_like(x)
    g_uw = torch.empty_like(uw)
    g_uh = torch.empty_like(uh)
    g_ud = torch.empty_like(ud)
    if n:
        launch(OP, f"rq_spline_bwd_{dtype_suffix(x.dtype)}", x.device, n,
               (ptr(g_out), ptr(g_lad), ptr(x), ptr(uw), ptr(uh), ptr(ud), ptr(g_x), ptr(g_uw), ptr(g_uh), ptr(g_ud),
                *_scalars(n, k, tb, mbw, mbh, md, inverse)))
    return g_x, g_uw, g_uh, g_ud


# The launcher interface of kernels/<backend>/spline.py (see kernels/reference/spline.py).
# nflows only: csrc/rq_spline.cu re-reads each row's raw sizes in every pass (softmax, the knot
# walk with its +-bound ends, the backward's chain), so another prologue is a second copy of those
# passes plus host-harness tests, not a switch; ops/rq_spline.py sends the other
# parameterisations to triton (first in the order on a GPU) or the reference.
PARAMETERIZATIONS = BACKEND.parameterizations


def _nflows_only(parameterization):
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"cuda rq_spline: no kernels for the {parameterization!r} parameterization")


def forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    _nflows_only(parameterization)
    out, lad = fwd(*flat_rows(x, uw, uh, ud), inverse, box[1], mbw, mbh, md)
    return out.view(x.shape), lad.view(x.shape)


def backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    _nflows_only(parameterization)
    g = bwd(g_out.reshape(-1).contiguous(), g_lad.reshape(-1).contiguous(), *flat_rows(x, uw, uh, ud), inverse,
            box[1], mbw, mbh, md)
    return tuple(gi.view(t.shape) for gi, t in zip(g, (x, uw, uh, ud)))
