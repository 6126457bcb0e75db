"""``fastflow.ops`` coupling laws: affine (RealNVP/Glow), additive (NICE), and NICE's rescaling.

- :func:`affine_coupling`: ``y = s*x + t`` with ``s`` from a raw scale ``h`` (``scale="exp"``,
  ``"softclamp"`` or ``"sigmoid"``); Dinh et al., "Density estimation using Real NVP" (ICLR 2017),
  Kingma & Dhariwal, "Glow" (NeurIPS 2018).
- :func:`additive_coupling`: ``y = x + t``; Dinh et al., "NICE" (ICLR 2015 workshop).
- :func:`rescale`: NICE's diagonal scaling ``y = exp(log_scale) * x``.

Each is an op generated from its definition (``fastflow/ops/_opdef.py``); the affine and
rescale laws' backward is a fused op recomputing what it needs from the inputs. Inputs are read
through their strides (the channel halves ``x[:, :C//2]``, the conditioner's ``h[:, ::2]``):
this module turns any ``(B, ...)`` layout into the strided ``(B, M, N)`` views of the kernels'
launcher interface (:mod:`fastflow.kernels.reference.coupling`), copying only what no view can
express. Small or nothing-to-fuse eager inputs are routed to the law's plain torch ops.
"""

from __future__ import annotations

import torch

from fastflow.backends import COMPOSITE, SMALL_CPU_ELEMS, get_kernel, resolve_backend
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference import coupling as _laws  # plain torch ops: imported here, traced by dynamo
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import check_batch, check_bool, check_positive_float, check_same, check_tensor, describe
from fastflow.ops._dispatch import _eager as _dispatch_eager
from fastflow.ops._layout import as_3d as _as_3d
from fastflow.ops._opdef import define

SCALES = _laws.SCALES
__all__ = ["affine_coupling", "additive_coupling", "rescale", "SCALES", "SMALL_CPU_ELEMS"]

_OUT = ("like:x", "batch:x")  # (outputs, logabsdet (B,))


def _lad_empty(x):
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def _contig(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# The ops (fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these)
# --------------------------------------------------------------------------------------------


def _affine_forward(x: torch.Tensor, shift: torch.Tensor, raw_scale: torch.Tensor, scale: str, clamp: float,
                    inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)
    out, lad = get_kernel("affine_coupling", backend).affine_fwd(*_as_3d([x, shift, raw_scale]), scale, clamp, inverse)
    return out.view(x.shape), lad


def _affine_backward(grad_outputs, grad_logabsdet, x, shift, raw_scale, scale, clamp, inverse, backend):
    # Only the inputs are kept; the backward recomputes s (and, for the inverse, its output).
    if x.numel() == 0:
        return _contig(x), _contig(raw_scale)
    v = _as_3d([grad_outputs, x, shift, raw_scale])
    g = get_kernel("affine_coupling", backend).affine_bwd(v[0], grad_logabsdet, *v[1:], scale, clamp, inverse)
    return g[0].view(x.shape), g[1].view(x.shape)


def _affine_shift_grad(args, grad_outputs, result):
    # d y/d t = 1 (forward) and d x/d t = -1/s (inverse): the shift's gradient needs no kernel.
    result[1] = -result[0] if args[5] else grad_outputs[0]


def _affine_composite(x, shift, raw_scale, scale, clamp, inverse, backend):
    out, lad = _laws.affine_in_dtype(*upcast(x, shift, raw_scale), scale, clamp, inverse)
    return out.to(x.dtype), lad.to(x.dtype)


_affine_coupling_op = define("affine_coupling", forward=_affine_forward, outputs=_OUT, backward=_affine_backward,
                             grads=("x", "raw_scale"), derived=_affine_shift_grad, composite=_affine_composite)


def _additive_forward(x: torch.Tensor, shift: torch.Tensor, inverse: bool, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)
    out = get_kernel("additive_coupling", backend).additive_fwd(*_as_3d([x, shift]), inverse)
    return out.view(x.shape), _lad_empty(x)


def _additive_grads(args, grad_outputs, result):
    # The Jacobian is the identity (and -identity for the shift in the inverse): the incoming
    # gradient is returned as it is, which no kernel could beat.
    g = grad_outputs[0]
    if g is not None:
        result[0], result[1] = g, (-g if args[2] else g)


def _additive_composite(x, shift, inverse, backend):
    return (x - shift if inverse else x + shift), _lad_empty(x)


_additive_coupling_op = define("additive_coupling", forward=_additive_forward, outputs=_OUT,
                               derived=_additive_grads, composite=_additive_composite)


def _rescale_views(x, log_scale, *more):
    """(B, M, N) views of ``x`` (and ``more``) and the matching (M, N) view of the event-shaped
    ``log_scale`` (viewed as a one-sample batch for the split)."""
    v = _as_3d([x, *more, log_scale.unsqueeze(0)])
    return v[0], v[-1][0], v[1:-1]


def _rescale_forward(x: torch.Tensor, log_scale: torch.Tensor, inverse: bool, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)  # an empty event's log-det, or an empty batch
    xv, lsv, _ = _rescale_views(x, log_scale)
    out, lad = get_kernel("rescale", backend).rescale_fwd(xv, lsv, inverse)
    return out.view(x.shape), lad


def _rescale_backward(grad_outputs, grad_logabsdet, x, log_scale, inverse, backend):
    if x.numel() == 0:
        # Either the event is empty (so is the gradient) or the batch is (no contribution).
        return _contig(x), torch.zeros_like(log_scale, memory_format=torch.contiguous_format)
    xv, lsv, (gv,) = _rescale_views(x, log_scale, grad_outputs)
    gx, gls = get_kernel("rescale", backend).rescale_bwd(gv, grad_logabsdet, xv, lsv, inverse)
    return gx.view(x.shape), gls.view(log_scale.shape)


def _rescale_composite(x, log_scale, inverse, backend):
    out, lad = _laws.rescale_in_dtype(*upcast(x, log_scale), inverse)
    return out.to(x.dtype), lad.to(x.dtype)


_rescale_op = define("rescale", forward=_rescale_forward, outputs=_OUT, backward=_rescale_backward,
                     grads=("x", "log_scale"), composite=_rescale_composite)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    raw_scale: torch.Tensor,
    *,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling law ``y = s * x + t`` (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018).

    Args:
        x: ``(B, ...)`` the transformed half (e.g. ``x[:, C//2:]`` of an image, read through its
            strides).
        shift: ``(B, ...)`` the conditioner's shift ``t``, same shape as ``x``.
        raw_scale: ``(B, ...)`` the conditioner's raw scale ``h``, same shape as ``x``.
        scale: how ``h`` becomes ``s > 0``: ``"exp"``: ``exp(h)`` (RealNVP); ``"softclamp"``:
            ``exp(clamp * tanh(h / clamp))`` (FrEIA, Glow-TTS), so ``|log s| <= clamp``;
            ``"sigmoid"``: ``sigmoid(h + 2)`` (the scale of Glow's released code, which adds
            the shift before scaling, ``(x + t') * s``: the same law with ``t = t' * s``).
        clamp: the soft clamp's bound (``scale="softclamp"`` only), > 0.
        inverse: compute ``x = (y - t) / s`` (evaluated as ``(y - t) * (1/s)``) instead.
        backend: ``None`` (fastest available), ``"reference"``, ``"numba"``, ``"triton"`` or
            ``"cuda"``; ``FASTFLOW_BACKEND`` sets the default.

    Returns:
        ``(outputs, logabsdet)``: outputs of ``x.shape`` (contiguous), and ``(B,)``
        ``sum(log s)`` over all non-batch dims (negated for the inverse).

    Numerics: with ``scale="exp"`` the log-det ``sum(h)`` is exact, but ``s = exp(h)`` overflows
    to ``inf`` past ``h ~ 88.7`` (float32) / ``709.8`` (float64): the outputs there are ``±inf``
    (NaN where ``x == 0``), and the inverse's are ``0``; use ``"softclamp"`` (always finite) to
    rule that out. ``"sigmoid"`` keeps ``log s`` finite for any finite ``h``; its ``s``
    underflows to 0 below ``h ~ -106`` (float32), where the inverse gives ``±inf``. A NaN in
    an element of ``x`` or ``shift`` stays in that output element; one in ``raw_scale`` also
    makes that sample's log-det NaN; other samples are untouched.
    """
    op = "affine_coupling"
    x, shift, raw_scale = autocast_args(x, shift, raw_scale)  # float32 under autocast
    check_batch(op, {"x": x, "shift": shift, "raw_scale": raw_scale})
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"{op}: scale must be one of {list(SCALES)}, got {scale!r}")
    clamp = check_positive_float(op, "clamp", clamp)
    inverse = check_bool(op, "inverse", inverse)
    name = resolve_backend(op, x, backend, routed=lambda: _dispatch_eager((x, shift, raw_scale)))
    if name == COMPOSITE:
        return _laws.affine_in_dtype(x, shift, raw_scale, scale, clamp, inverse)
    return _affine_coupling_op(x, shift, raw_scale, scale, clamp, inverse, name)


def additive_coupling(
    x: torch.Tensor, shift: torch.Tensor, *, inverse: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive coupling law ``y = x + t`` (NICE, Dinh, Krueger & Bengio 2015); volume-preserving.

    Args:
        x: ``(B, ...)``; shift: the conditioner's ``t``, same shape.
        inverse: compute ``x = y - t`` instead.

    Returns:
        ``(outputs of x.shape, logabsdet zeros (B,))``.
    """
    op = "additive_coupling"
    x, shift = autocast_args(x, shift)
    check_batch(op, {"x": x, "shift": shift})
    inverse = check_bool(op, "inverse", inverse)
    name = resolve_backend(op, x, backend, routed=lambda: _dispatch_eager((x, shift)))
    if name == COMPOSITE:
        return _laws.additive_in_dtype(x, shift, inverse)
    return _additive_coupling_op(x, shift, inverse, name)


def rescale(
    x: torch.Tensor, log_scale: torch.Tensor, *, inverse: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NICE's diagonal scaling layer ``y = exp(log_scale) * x`` (Dinh, Krueger & Bengio 2015).

    Args:
        x: ``(B, ...)``.
        log_scale: the event shape ``x.shape[1:]``, or broadcastable to it (e.g. ``(C, 1, 1)``
            for one scale per channel); its gradient is summed back to its own shape.
        inverse: compute ``x = exp(-log_scale) * y`` instead.

    Returns:
        ``(outputs of x.shape, logabsdet (B,))``: the log-det is ``sum(log_scale)`` over the
        (broadcast) event, the same for every sample (negated for the inverse).
    """
    op = "rescale"
    x, log_scale = autocast_args(x, log_scale)
    for name, t in (("x", x), ("log_scale", log_scale)):
        check_tensor(name, t, op=op)
    check_same(op, {"x": x, "log_scale": log_scale})
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a batch dimension (B, ...), got {describe(x)}")
    event = x.shape[1:]
    try:
        ok = log_scale.dim() <= len(event) and torch.broadcast_shapes(log_scale.shape, event) == event
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: log_scale must have the event shape {tuple(event)} of x (or broadcast to it), "
                         f"got {describe(log_scale)}")
    inverse = check_bool(op, "inverse", inverse)
    name = resolve_backend(op, x, backend, routed=lambda: _dispatch_eager((x, log_scale)))
    if name == COMPOSITE:
        return _laws.rescale_in_dtype(x, log_scale.expand(event), inverse)
    return _rescale_op(x, log_scale.expand(event), inverse, name)
