"""``fastflow.ops.rq_spline_circular``: the circular rational-quadratic spline on angles
(Rezende, Papamakarios, Racanière et al., "Normalizing Flows on Tori and Spheres", ICML 2020), as
zuko's ``CircularRQSTransform`` (the law of zuko's ``NCSF`` and sbi's ``zuko_ncsf``).

On ``[-pi, pi)`` the map is a rotation by ``pi`` (``x mod 2 pi - pi``) followed by zuko's
monotonic spline on ``[-pi, pi]^2`` whose two boundary slopes are both 1: the ends meet with equal
value (mod ``2 pi``) and equal slope, so the map is a diffeomorphism of the circle. One custom op,
``fastflow::rq_spline_circular``, whose forward and fused backward run the spline's kernels (zuko's
prologue) on the rotated angles; the rotation is one elementwise pass inside the op, and its
derivative is 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference.spline import evaluate
from fastflow.ops._checks import check_bool
from fastflow.ops._opdef import define
from fastflow.ops.rq_spline import OP as SPLINE
from fastflow.ops.rq_spline import _checked, _expand, _options

__all__ = ["rq_spline_circular"]

OP = "rq_spline_circular"
PI = math.pi


def _rotate(x: Tensor) -> Tensor:
    """``x mod 2 pi - pi``: zuko's ``CircularShiftTransform(bound=pi)``, its own inverse on the circle."""
    return torch.remainder(x, 2 * PI) - PI


def _spline_options(slope, backend):
    return _options(PI, 0.0, 0.0, 0.0, backend, "zuko", slope=slope)


# The op: fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these.
def _forward(inputs: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor,
             inverse: bool, slope: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    backend, *options = _spline_options(slope, backend)
    kernel, dtype = get_kernel(SPLINE, backend), inputs.dtype
    inputs, *params = _compute_dtype(inputs, widths, heights, derivatives)
    if inverse:  # the spline's inverse, then the rotation back
        out, lad = kernel.forward(inputs, *params, True, *options)
        out = _rotate(out)
    else:
        out, lad = kernel.forward(_rotate(inputs), *params, False, *options)
    return out.to(dtype), lad.to(dtype)


def _backward(grad_outputs, grad_logabsdet, inputs, widths, heights, derivatives, inverse, slope, backend):
    # d rotate / dx = 1: the spline's gradients at the rotated angles (forward) or as they are (inverse)
    if inputs.numel() == 0:
        return torch.empty_like(inputs), *(torch.empty_like(p) for p in (widths, heights, derivatives))
    backend, *options = _spline_options(slope, backend)
    dtype = inputs.dtype
    go, gl, x, *params = _compute_dtype(grad_outputs, grad_logabsdet, inputs, widths, heights, derivatives)
    grads = get_kernel(SPLINE, backend).backward(go, gl, x if inverse else _rotate(x), *params, inverse, *options)
    return tuple(g.to(dtype) for g in grads)


def _compute_dtype(*ts):
    """16-bit storage computes in float32 (the rotation included: in bfloat16 its rounding alone
    is tens of ulps of the result); other dtypes as they are."""
    return [t.float() for t in ts] if ts[0].dtype in (torch.float16, torch.bfloat16) else list(ts)


def _composite(x, widths, heights, derivatives, inverse, slope, backend):  # the reference, in torch ops
    dtype = x.dtype
    x, *params = upcast(x, widths, heights, derivatives)
    options = _spline_options(slope, backend)[1:]
    if inverse:
        out, lad = evaluate(x, *params, True, *options)
        out = _rotate(out)
    else:
        out, lad = evaluate(_rotate(x), *params, False, *options)
    return out.to(dtype), lad.to(dtype)


_circular_op = define(OP, forward=_forward, outputs=("like:inputs", "like:inputs"), backward=_backward,
                      grads=("inputs", "widths", "heights", "derivatives"), composite=_composite)


def rq_spline_circular(inputs: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, *,
                       inverse: bool = False, slope: float = 1e-3,
                       backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Circular rational-quadratic spline on angles, elementwise (Rezende et al., 2020).

    Element for element zuko's ``CircularRQSTransform(widths, heights, derivatives, slope=slope)``:
    ``y = S(x mod 2 pi - pi)`` with ``S`` zuko's monotonic spline (:func:`rq_spline_zuko`) on
    ``[-pi, pi]`` whose boundary slopes are 1, so that ``y`` is a diffeomorphism of the circle
    ``[-pi, pi)``. A zero-parameter spline is the identity, so a fresh law rotates by ``pi``.

    Args:
        inputs: ``(...)`` angles; any real value is taken modulo ``2 pi`` (forward). For the
            inverse, values in ``[-pi, pi]`` (outside, the spline is the identity).
        widths, heights: ``(..., K)`` raw bin widths and heights; derivatives: ``(..., K-1)``
            raw interior slopes (zuko's parameterisation); leading dims equal to
            ``inputs.shape`` or broadcastable to it.
        inverse: evaluate the inverse map, whose outputs lie in ``[-pi, pi)``.
        slope: the minimum slope, in ``(0, 1)``.
        backend: as for :func:`rq_spline`.

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape`` and dtype (a NaN input gives NaN in
        both at that element only; an empty input gives empty outputs).
    """
    inputs, params, (*_, slope) = _checked("zuko", (inputs, widths, heights, derivatives), PI, 0.0, 0.0, 0.0,
                                           slope=slope, caller=OP)
    name = resolve_backend(SPLINE, inputs, backend, parameterization="zuko", caller=OP)
    inverse = check_bool(OP, "inverse", inverse)
    return _circular_op(inputs, *_expand(inputs, params), inverse, slope, name)
