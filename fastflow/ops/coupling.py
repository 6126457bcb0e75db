"""``fastflow.ops`` coupling laws: affine (RealNVP/Glow), additive (NICE), and NICE's rescaling.

- :func:`affine_coupling`: ``y = s*x + t`` with ``s`` from a raw scale ``h`` (``scale="exp"``,
  ``"softclamp"`` or ``"sigmoid"``); Dinh et al., "Density estimation using Real NVP" (ICLR 2017),
  Kingma & Dhariwal, "Glow" (NeurIPS 2018).
- :func:`additive_coupling`: ``y = x + t``; Dinh et al., "NICE" (ICLR 2015 workshop).
- :func:`rescale`: NICE's diagonal scaling ``y = exp(log_scale) * x``.

Each is a custom op (``fastflow::affine_coupling``, ``fastflow::additive_coupling``,
``fastflow::rescale``) with a fake impl and autograd; the backward of the affine and rescale
laws is its own fused op that recomputes what it needs from the inputs. Inputs are read
through their strides: the channel halves ``x[:, :C//2]`` and the conditioner's
``h[:, ::2]``/``h[:, 1::2]`` or chunks are passed to the kernels as views, never copied.

The kernels' launcher interface (``affine_fwd``, ``affine_bwd``, ``additive_fwd``,
``rescale_fwd``, ``rescale_bwd`` on strided ``(B, M, N)`` views) is documented in
:mod:`fastflow.kernels.reference.coupling`; this module turns any ``(B, ...)`` layout into such
views (copying only what no view can express).
"""

from __future__ import annotations


import torch

from fastflow.backends import SMALL_CPU_ELEMS, get_kernel, resolve_backend, routed_backend
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference.coupling import SCALES
from fastflow.kernels.torch import coupling as _torch_laws  # plain torch ops: imported here, traced by dynamo
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import check_bool, check_positive_float, check_same, check_tensor, describe
from fastflow.ops._dispatch import _eager as _dispatch_eager
from fastflow.ops._dispatch import custom_op
from fastflow.ops._layout import as_3d as _as_3d
from fastflow.ops._spec import BadInput, OpSpec, declare, fake_outputs

__all__ = ["affine_coupling", "additive_coupling", "rescale", "SCALES", "SMALL_CPU_ELEMS"]

OPS = ("affine_coupling", "additive_coupling", "rescale")


_OUT = ("like:x", "batch:x")  # (outputs, logabsdet (B,))


def _lad_empty(x):
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def _contig(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# affine_coupling
# --------------------------------------------------------------------------------------------


@custom_op("fastflow::affine_coupling")
def _affine_coupling_op(
    x: torch.Tensor, shift: torch.Tensor, raw_scale: torch.Tensor, scale: str, clamp: float, inverse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)
    v = _as_3d([x, shift, raw_scale])
    out, lad = get_kernel("affine_coupling", backend).affine_fwd(*v, scale, clamp, inverse)
    return out.view(x.shape), lad


_affine_coupling_op.register_fake(fake_outputs(("x",), _OUT))


@custom_op("fastflow::affine_coupling_backward")
def _affine_coupling_backward_op(
    grad_outputs: torch.Tensor, grad_logabsdet: torch.Tensor, x: torch.Tensor, shift: torch.Tensor,
    raw_scale: torch.Tensor, scale: str, clamp: float, inverse: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _contig(raw_scale)
    v = _as_3d([grad_outputs, x, shift, raw_scale])
    g = get_kernel("affine_coupling", backend).affine_bwd(v[0], grad_logabsdet, *v[1:], scale, clamp, inverse)
    return g[0].view(x.shape), g[1].view(x.shape)


_affine_coupling_backward_op.register_fake(fake_outputs(("g_out", "g_lad", "x", "shift", "raw_scale"),
                                                       ("like:x", "like:raw_scale")))


def _affine_setup(ctx, inputs, output):
    x, shift, raw_scale, scale, clamp, inverse, backend = inputs
    # Only the inputs are kept; the backward recomputes s (and, for the inverse, its output).
    ctx.save_for_backward(x, shift, raw_scale)
    ctx.args = (scale, clamp, inverse, backend)


def _affine_backward(ctx, grad_out, grad_lad):
    x, shift, raw_scale = ctx.saved_tensors
    scale, clamp, inverse, backend = ctx.args
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out
    grad_lad = x.new_zeros(x.shape[0]) if grad_lad is None else grad_lad
    g_x, g_raw = _affine_coupling_backward_op(grad_out, grad_lad, x, shift, raw_scale, scale, clamp, inverse, backend)
    # d y/d t = 1 (forward) and d x/d t = -1/s (inverse): the shift's gradient needs no kernel.
    g_shift = -g_x if inverse else grad_out
    return g_x, g_shift, g_raw, None, None, None, None


def _affine_composite(x, shift, raw_scale, scale, clamp, inverse, backend):
    from fastflow.kernels.torch.coupling import affine

    out, lad = affine(*upcast(x, shift, raw_scale), scale, clamp, inverse)
    return out.to(x.dtype), lad.to(x.dtype)


_affine_coupling_op.register_autograd(_affine_backward, setup_context=_affine_setup, composite=_affine_composite)


# --------------------------------------------------------------------------------------------
# additive_coupling
# --------------------------------------------------------------------------------------------


@custom_op("fastflow::additive_coupling")
def _additive_coupling_op(
    x: torch.Tensor, shift: torch.Tensor, inverse: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)
    out = get_kernel("additive_coupling", backend).additive_fwd(*_as_3d([x, shift]), inverse)
    return out.view(x.shape), _lad_empty(x)


_additive_coupling_op.register_fake(fake_outputs(("x",), _OUT))


def _additive_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])  # only for a double backward's composite (no copy)
    ctx.inverse = inputs[2]


def _additive_backward(ctx, grad_out, grad_lad):
    # The Jacobian is the identity (and -identity for the shift in the inverse): the incoming
    # gradient is returned as it is, which no kernel could beat.
    if grad_out is None:
        return None, None, None, None
    return grad_out, (-grad_out if ctx.inverse else grad_out), None, None


def _additive_composite(x, shift, inverse, backend):
    return (x - shift if inverse else x + shift), _lad_empty(x)


_additive_coupling_op.register_autograd(_additive_backward, setup_context=_additive_setup,
                                        composite=_additive_composite)


# --------------------------------------------------------------------------------------------
# rescale
# --------------------------------------------------------------------------------------------


def _rescale_views(x, log_scale, *more):
    """(B, M, N) views of ``x`` (and ``more``) and the matching (M, N) view of the event-shaped
    ``log_scale`` (viewed as a one-sample batch for the split)."""
    v = _as_3d([x, *more, log_scale.unsqueeze(0)])
    return v[0], v[-1][0], v[1:-1]


@custom_op("fastflow::rescale")
def _rescale_op(x: torch.Tensor, log_scale: torch.Tensor, inverse: bool, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _contig(x), _lad_empty(x)  # an empty event's log-det, or an empty batch
    xv, lsv, _ = _rescale_views(x, log_scale)
    out, lad = get_kernel("rescale", backend).rescale_fwd(xv, lsv, inverse)
    return out.view(x.shape), lad


_rescale_op.register_fake(fake_outputs(("x",), _OUT))


@custom_op("fastflow::rescale_backward")
def _rescale_backward_op(
    grad_outputs: torch.Tensor, grad_logabsdet: torch.Tensor, x: torch.Tensor, log_scale: torch.Tensor,
    inverse: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        # Either the event is empty (so is the gradient) or the batch is (no contribution).
        return _contig(x), torch.zeros_like(log_scale, memory_format=torch.contiguous_format)
    xv, lsv, (gv,) = _rescale_views(x, log_scale, grad_outputs)
    gx, gls = get_kernel("rescale", backend).rescale_bwd(gv, grad_logabsdet, xv, lsv, inverse)
    return gx.view(x.shape), gls.view(log_scale.shape)


_rescale_backward_op.register_fake(fake_outputs(("g_out", "g_lad", "x", "log_scale"), ("like:x", "like:log_scale")))


def _rescale_setup(ctx, inputs, output):
    x, log_scale, inverse, backend = inputs
    ctx.save_for_backward(x, log_scale)
    ctx.args = (inverse, backend)


def _rescale_backward(ctx, grad_out, grad_lad):
    x, log_scale = ctx.saved_tensors
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out
    grad_lad = x.new_zeros(x.shape[0]) if grad_lad is None else grad_lad
    g_x, g_ls = _rescale_backward_op(grad_out, grad_lad, x, log_scale, *ctx.args)
    return g_x, g_ls, None, None


def _rescale_composite(x, log_scale, inverse, backend):
    from fastflow.kernels.torch.coupling import rescale as rescale_torch

    out, lad = rescale_torch(*upcast(x, log_scale), inverse)
    return out.to(x.dtype), lad.to(x.dtype)


_rescale_op.register_autograd(_rescale_backward, setup_context=_rescale_setup, composite=_rescale_composite)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _backend_for(op: str, backend, *tensors) -> str:
    """The registry's choice: a route (``backend=None``, eager inputs) or the default order;
    ``"torch"`` means plain torch ops, called outside the custom op."""
    if backend is None:
        routed = routed_backend(op, tensors[0], lambda: _dispatch_eager(tensors))
        if routed is not None:
            return routed
    return resolve_backend(op, tensors[0], backend)


def _check_batch(op: str, named: dict) -> None:
    for name, t in named.items():
        check_tensor(name, t, op=op)
    check_same(op, named)
    (n0, t0), *rest = named.items()
    if t0.dim() < 1:
        raise ValueError(f"{op}: {n0} must have a batch dimension (B, ...), got {describe(t0)}")
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{op}: {name} must have the shape of {n0} {tuple(t0.shape)}, got {describe(t)}")


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
    _check_batch(op, {"x": x, "shift": shift, "raw_scale": raw_scale})
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"{op}: scale must be one of {list(SCALES)}, got {scale!r}")
    clamp = check_positive_float(op, "clamp", clamp)
    inverse = check_bool(op, "inverse", inverse)
    name = _backend_for(op, backend, x, shift, raw_scale)
    if name == "torch":
        return _torch_laws.affine(x, shift, raw_scale, scale, clamp, inverse)
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
    _check_batch(op, {"x": x, "shift": shift})
    inverse = check_bool(op, "inverse", inverse)
    name = _backend_for(op, backend, x, shift)
    if name == "torch":
        return _torch_laws.additive(x, shift, inverse)
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
    name = _backend_for(op, backend, x, log_scale)
    if name == "torch":
        return _torch_laws.rescale(x, log_scale.expand(event), inverse)
    return _rescale_op(x, log_scale.expand(event), inverse, name)


# --------------------------------------------------------------------------------------------
# Declarations (fastflow/ops/_spec.py): kernels/<backend>/coupling.py implement the launcher
# interface documented in kernels/reference/coupling.py; csrc/coupling.cu has the affine and
# additive laws (rescale has no CUDA kernel). The torch backend's kernels are plain
# differentiable torch ops called outside the custom op (the routes in fastflow.backends).
# --------------------------------------------------------------------------------------------


def _randn(gen, dtype, device, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _batch_example(n):
    def example(shape, dtype, device, gen, **kwargs):
        return [_randn(gen, dtype, device, *shape, scale=0.7) for _ in range(n)], kwargs

    return example


def _rescale_example(shape, dtype, device, gen):
    # a per-channel scale (broadcast over the rest of the event) for image-like inputs
    ls_shape = (shape[1],) + (1,) * (len(shape) - 2) if len(shape) > 2 else shape[1:]
    return [_randn(gen, dtype, device, *shape), _randn(gen, dtype, device, *ls_shape, scale=0.4)], {}


def _mismatch(i):
    return lambda t, kw: ([*t[:i], t[i][:, :1], *t[i + 1:]], kw)


_BAD = (
    BadInput("integer x", lambda t, kw: ([torch.zeros(t[0].shape, dtype=torch.int64), *t[1:]], kw), TypeError,
             "x must have a floating dtype"),
    BadInput("mixed dtypes", lambda t, kw: ([t[0], t[1].to(torch.float16), *t[2:]], kw), TypeError,
             "has dtype float16 but x has"),
    BadInput("a scalar x", lambda t, kw: ([v.reshape(-1)[0] for v in t], kw), ValueError, "batch dimension"),
    BadInput("another device", lambda t, kw: ([t[0], t[1].to("meta"), *t[2:]], kw), ValueError,
             "is on device meta but x is on"),
)
_SHAPES = ((6, 4), (5, 3, 4, 4), (1, 1), (0, 4), (3, 0))
_COMMON = dict(kernels="coupling", logdet="sample", outputs=_OUT, shapes=_SHAPES)
declare(OpSpec(
    name="affine_coupling", op="affine_coupling", fn=affine_coupling, inputs=("x", "shift", "raw_scale"),
    grad_inputs=("x", "shift", "raw_scale"),
    example=_batch_example(3), fused=lambda: _affine_coupling_op,
    op_args=lambda t, kw, inverse, backend: (*t, kw.get("scale", "exp"), kw.get("clamp", 2.0), inverse, backend),
    options=({"scale": "exp"}, {"scale": "softclamp", "clamp": 1.5}, {"scale": "sigmoid"}),
    bad=_BAD + (BadInput("shift of another shape", _mismatch(1), ValueError, "shift must have the shape of x"),
                BadInput("an unknown scale", lambda t, kw: (t, {**kw, "scale": "tanh"}), ValueError,
                         "scale must be one of"),
                BadInput("a zero clamp", lambda t, kw: (t, {**kw, "clamp": 0.0}), ValueError, "clamp")),
    **_COMMON))
declare(OpSpec(
    name="additive_coupling", op="additive_coupling", fn=additive_coupling, inputs=("x", "shift"),
    grad_inputs=("x", "shift"),
    example=_batch_example(2), fused=lambda: _additive_coupling_op,
    op_args=lambda t, kw, inverse, backend: (*t, inverse, backend),
    bad=_BAD + (BadInput("shift of another shape", _mismatch(1), ValueError, "shift must have the shape of x"),),
    **_COMMON))
declare(OpSpec(
    name="rescale", op="rescale", fn=rescale, inputs=("x", "log_scale"), grad_inputs=("x", "log_scale"),
    example=_rescale_example, fused=lambda: _rescale_op,
    op_args=lambda t, kw, inverse, backend: (t[0], t[1].expand(t[0].shape[1:]), inverse, backend),
    bad=_BAD[:2] + _BAD[3:] + (
        BadInput("a log_scale of another event", lambda t, kw: ([t[0], torch.zeros(7, dtype=t[1].dtype)], kw),
                 ValueError, "log_scale must have the event shape"),),
    **_COMMON))
