"""Bridges from the layers to the fused ops in :mod:`fastflow.ops` (one place to adapt them),
plus the dense LU weight for inspection (``layer.weight()``).
"""

from __future__ import annotations

import torch

from fastflow.ops.coupling import additive_coupling, affine_coupling
from fastflow.ops.coupling import rescale as _rescale_op
from fastflow.ops.lu import actnorm_conv1x1, lu_conv1x1, lu_linear
from fastflow.ops.rq_spline import rq_spline

__all__ = ["affine", "additive", "rescale", "rq_spline", "lu_linear", "lu_conv1x1", "actnorm_conv1x1",
           "lu_weight"]


def affine(x, shift, raw_scale, *, scale="exp", clamp=2.0, inverse=False):
    """``y = s(raw_scale) * x + shift`` elementwise over ``(B, ...)``; returns ``(y, logabsdet (B,))``."""
    return affine_coupling(x, shift, raw_scale, scale=scale, clamp=clamp, inverse=inverse)


def additive(x, shift, *, inverse=False):
    """``y = x + shift``; returns ``(y, zeros (B,))``."""
    return additive_coupling(x, shift, inverse=inverse)


def rescale(x, log_scale, *, inverse=False):
    """NICE's diagonal scaling ``y = x * exp(log_scale)``; ``log_scale`` has the event shape."""
    return _rescale_op(x, log_scale, inverse=inverse)


def lu_weight(perm, lower, upper, log_s, sign):
    """``W = P L (U + diag(sign * exp(log_s)))`` with ``(P A)[i] = A[perm[i]]``, ``L`` unit lower
    (the convention of :mod:`fastflow.ops.lu`)."""
    c = log_s.shape[0]
    eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    lo = torch.tril(lower, -1) + eye
    up = torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s))
    return (lo @ up)[perm]
