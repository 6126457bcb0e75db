"""``fastflow.ops.rq_spline``: the rational-quadratic spline of Neural Spline Flows.

Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019. The function is,
element for element, nflows' ``unconstrained_rational_quadratic_spline(..., tails="linear")``:
a monotonic rational-quadratic spline on ``[-tail_bound, tail_bound]`` with ``K`` bins whose
widths, heights and interior knot slopes come from unconstrained parameters (softmax, softmax,
softplus), boundary slopes 1, and the identity outside.

The op is the custom op ``fastflow::rq_spline`` (fake impl + autograd), its backward the custom
op ``fastflow::rq_spline_backward``, a fused kernel that recomputes the forward from the inputs
(nothing but the inputs is saved), so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import importlib
import math

import torch

from fastflow.backends import BackendUnavailableError, env_backend, get_kernel, register_kernel, resolve_backend
from fastflow.ops._checks import check_positive_float, check_same, check_tensor, describe
from fastflow.ops._dispatch import custom_op

__all__ = ["rq_spline", "rq_spline_bounded", "rq_spline_zuko", "PARAMETERIZATIONS"]

OP = "rq_spline"
_MAX_BINS = 1024
# The spline's parameterisations (prologues raw -> knots and slopes, evaluated inside each
# kernel): "nflows" (unconstrained, linear tails: rq_spline), "nflows_bounded"
# (rq_spline_bounded), "zuko" (rq_spline_zuko). See kernels/reference/spline.py.
PARAMETERIZATIONS = ("nflows", "nflows_bounded", "zuko")


# Each backend's kernels (kernels/<backend>/spline.py) implement one launcher interface,
# documented in kernels/reference/spline.py: forward/backward on flat contiguous tensors with
# the parameterisation and its box, and the PARAMETERIZATIONS they have prologues for.
for _backend in ("reference", "numba", "triton", "cuda"):
    register_kernel(OP, _backend, lambda b=_backend: importlib.import_module(f"fastflow.kernels.{b}.spline"))


def _box(parameterization, tail_bound, left, right, bottom, top):
    if parameterization == "nflows":
        return (-tail_bound, tail_bound, -tail_bound, tail_bound)
    return (left, right, bottom, top)


def _flat(x, uw, uh, ud):
    k = uw.shape[-1]
    return (
        x.reshape(-1).contiguous(),
        uw.reshape(-1, k).contiguous(),
        uh.reshape(-1, k).contiguous(),
        ud.reshape(-1, ud.shape[-1]).contiguous(),
    )


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@custom_op("fastflow::rq_spline")
def _rq_spline_op(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool,
    tail_bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
    backend: str,
    parameterization: str = "nflows",
    left: float = -1.0,
    right: float = 1.0,
    bottom: float = -1.0,
    top: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    flat = _flat(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
    box = _box(parameterization, tail_bound, left, right, bottom, top)
    out, lad = get_kernel(OP, backend).forward(*flat, inverse, parameterization, box, min_bin_width,
                                               min_bin_height, min_derivative)
    return out.view(inputs.shape), lad.view(inputs.shape)


@_rq_spline_op.register_fake
def _(inputs, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend, parameterization="nflows", left=-1.0,
      right=1.0, bottom=-1.0, top=1.0):
    return torch.empty_like(inputs, memory_format=torch.contiguous_format), torch.empty_like(
        inputs, memory_format=torch.contiguous_format
    )


@custom_op("fastflow::rq_spline_backward")
def _rq_spline_backward_op(
    grad_outputs: torch.Tensor,
    grad_logabsdet: torch.Tensor,
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool,
    tail_bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
    backend: str,
    parameterization: str = "nflows",
    left: float = -1.0,
    right: float = 1.0,
    bottom: float = -1.0,
    top: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
    if inputs.numel() == 0:
        return torch.empty_like(inputs), *(torch.empty_like(p) for p in params)
    flat = _flat(inputs, *params)
    g_out = grad_outputs.reshape(-1).contiguous()
    g_lad = grad_logabsdet.reshape(-1).contiguous()
    box = _box(parameterization, tail_bound, left, right, bottom, top)
    g = get_kernel(OP, backend).backward(g_out, g_lad, *flat, inverse, parameterization, box, min_bin_width,
                                         min_bin_height, min_derivative)
    return g[0].view(inputs.shape), *(gi.view(p.shape) for gi, p in zip(g[1:], params))


@_rq_spline_backward_op.register_fake
def _(g_out, g_lad, inputs, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend, parameterization="nflows",
      left=-1.0, right=1.0, bottom=-1.0, top=1.0):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (inputs, uw, uh, ud))


def _setup_context(ctx, inputs, output):
    x, uw, uh, ud, *args = inputs
    ctx.save_for_backward(x, uw, uh, ud)
    ctx.args = tuple(args)  # inverse, tail_bound, mbw, mbh, md, backend[, parameterization, box...]


def _backward(ctx, grad_out, grad_lad):
    x, uw, uh, ud = ctx.saved_tensors
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out
    grad_lad = torch.zeros_like(x) if grad_lad is None else grad_lad
    g = _rq_spline_backward_op(grad_out, grad_lad, x, uw, uh, ud, *ctx.args)
    return (*g, *(None,) * len(ctx.args))


def _composite(x, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend, parameterization="nflows", left=-1.0,
               right=1.0, bottom=-1.0, top=1.0):
    """The spline in differentiable torch ops (the reference), for double backward."""
    from fastflow.kernels.reference._precision import upcast
    from fastflow.kernels.reference.spline import evaluate

    box = _box(parameterization, tail_bound, left, right, bottom, top)
    out, lad = evaluate(*upcast(x, uw, uh, ud), inverse, parameterization, box, mbw, mbh, md)
    return out.to(x.dtype), lad.to(x.dtype)


def _jvp(args, tangents):
    """Forward mode: each output element depends on its own input and K-sized parameters only,
    so the JVP is the local derivative times the tangent plus the parameter terms; those
    derivatives are two calls of the fused backward (output and log-det rows of the Jacobian)."""
    x, uw, uh, ud, *rest = args
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    bwd = _rq_spline_backward_op.op  # the registered op itself: inside a jvp rule, no re-dispatch
    rows = (bwd(ones, zeros, x, uw, uh, ud, *rest), bwd(zeros, ones, x, uw, uh, ud, *rest))
    out = []
    for g in rows:
        acc = zeros
        if tangents[0] is not None:
            acc = acc + g[0] * tangents[0]
        for gi, ti in zip(g[1:], tangents[1:4]):
            if ti is not None:
                acc = acc + (gi * ti).sum(-1)
        out.append(acc)
    return tuple(out)


_rq_spline_op.register_autograd(_backward, setup_context=_setup_context, composite=_composite, jvp=_jvp)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check(inputs, uw, uh, ud, tail_bound, mbw, mbh, md, op="rq_spline", n_derivs=-1,
           names=("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives")):
    named = {"inputs": inputs, names[0]: uw, names[1]: uh, names[2]: ud}
    for name, t in named.items():
        check_tensor(name, t, op=op)
    check_same(op, named)
    for name, t in list(named.items())[1:]:
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} needs a trailing bin dimension, got {describe(t)}")
    k = uw.shape[-1]
    if not 2 <= k <= _MAX_BINS:
        # K=1 is the identity (one bin, unit end slopes): almost surely a shape mistake.
        raise ValueError(f"{op}: {names[0]} must have 2..{_MAX_BINS} bins in its last dim, got {describe(uw)}")
    if uh.shape[-1] != k:
        raise ValueError(
            f"{op}: {names[1]} must have K={k} bins in its last dim like {names[0]}, got {describe(uh)}"
        )
    if ud.shape[-1] != k + n_derivs:
        what = "interior knots; boundary slopes are 1" if n_derivs < 0 else "every knot, boundaries included"
        raise ValueError(
            f"{op}: {names[2]} must have K{n_derivs:+d}={k + n_derivs} entries in its last dim "
            f"({what}), got {describe(ud)}"
        )
    for name, t in list(named.items())[1:]:
        try:
            shape = torch.broadcast_shapes(t.shape[:-1], inputs.shape)
        except RuntimeError:
            shape = None
        if shape != inputs.shape:
            raise ValueError(
                f"{op}: {name} must have leading shape {tuple(inputs.shape)} (that of inputs, or "
                f"broadcastable to it) plus the bin dimension, got {describe(t)}"
            )
    tail_bound = check_positive_float(op, "tail_bound", tail_bound)
    mbw = check_positive_float(op, "min_bin_width", mbw, allow_zero=True)
    mbh = check_positive_float(op, "min_bin_height", mbh, allow_zero=True)
    md = check_positive_float(op, "min_derivative", md, allow_zero=True)
    for name, v in (("min_bin_width", mbw), ("min_bin_height", mbh)):
        if v * k >= 1.0:
            raise ValueError(f"{op}: {name}={v} times K={k} bins must be < 1")
    return tail_bound, mbw, mbh, md


def rq_spline(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    tail_bound: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline with linear tails, elementwise (Durkan et al., 2019).

    A drop-in for nflows' ``unconstrained_rational_quadratic_spline(..., tails="linear")``.

    Args:
        inputs: ``(...)`` values to transform.
        unnormalized_widths: ``(..., K)`` raw bin widths (softmax-normalised).
        unnormalized_heights: ``(..., K)`` raw bin heights (softmax-normalised).
        unnormalized_derivatives: ``(..., K-1)`` raw slopes at the interior knots
            (``min_derivative + softplus``); the slopes at ``+-tail_bound`` are 1.
            The parameters' leading dims must equal ``inputs.shape`` or broadcast to it.
        inverse: evaluate the inverse spline instead.
        tail_bound: the spline acts on ``[-tail_bound, tail_bound]``, the identity outside.
        min_bin_width, min_bin_height, min_derivative: floors keeping the spline well-conditioned.
        backend: ``None`` (fastest available), ``"reference"``, ``"numba"``, ``"triton"`` or
            ``"cuda"``; ``FASTFLOW_BACKEND`` sets the default.

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape`` and dtype: the transformed values and
        ``log|d outputs / d inputs|`` elementwise. A NaN input gives NaN in both at that element
        only; an empty input gives empty outputs.
    """
    tail_bound, mbw, mbh, md = _check(
        inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
        tail_bound, min_bin_width, min_bin_height, min_derivative,
    )
    name = resolve_backend(OP, inputs, backend)
    params = []
    for p in (unnormalized_widths, unnormalized_heights, unnormalized_derivatives):
        if p.shape[:-1] != inputs.shape:
            p = p.expand(*inputs.shape, p.shape[-1])  # autograd sums the gradient back
        params.append(p)
    return _rq_spline_op(inputs, *params, bool(inverse), tail_bound, mbw, mbh, md, name)


def _expand(inputs, params):
    out = []
    for p in params:
        if p.shape[:-1] != inputs.shape:
            p = p.expand(*inputs.shape, p.shape[-1])  # autograd sums the gradient back
        out.append(p)
    return out


def _param_backend(op, inputs, backend, parameterization) -> str:
    """The backend for a parameterisation other than "nflows": the one ``backend=None`` picks when
    its kernels have that prologue, else the reference (on any device); a forced backend (argument
    or FASTFLOW_BACKEND) without it raises."""
    name = resolve_backend(OP, inputs, backend)
    if parameterization in getattr(get_kernel(OP, name), "PARAMETERIZATIONS", ("nflows",)):
        return name
    if backend is not None or env_backend() is not None:
        raise BackendUnavailableError(
            f"{op}: backend {name!r} has no kernels for the {parameterization!r} spline parameterization; "
            "use backend=None, 'reference' or 'numba'")
    return "reference"


def rq_spline_bounded(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    left: float = 0.0,
    right: float = 1.0,
    bottom: float = 0.0,
    top: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline on the box ``[left, right] x [bottom, top]`` (Durkan et al., 2019).

    Element for element nflows' ``rational_quadratic_spline`` (what its transforms use with
    ``tails=None``): ``K`` bins, widths and heights ``min + (1 - min*K) * softmax(raw)``, and ``K+1``
    learned knot slopes ``min_derivative + softplus(raw)`` including both boundaries. The same
    fused op as :func:`rq_spline` with another prologue.

    Args:
        inputs: ``(...)``; in ``[left, right]`` (forward) or ``[bottom, top]`` (inverse). nflows
            raises for values outside; here they pass through unchanged with log-det 0.
        unnormalized_widths, unnormalized_heights: ``(..., K)`` raw bin sizes.
        unnormalized_derivatives: ``(..., K+1)`` raw slopes at every knot.
        inverse, min_bin_width, min_bin_height, min_derivative, backend: as for :func:`rq_spline`.
        left, right, bottom, top: the box (``left < right``, ``bottom < top``).

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape``.
    """
    op = "rq_spline_bounded"
    _, mbw, mbh, md = _check(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, 1.0,
                             min_bin_width, min_bin_height, min_derivative, op=op, n_derivs=1)
    box = tuple(float(v) for v in (left, right, bottom, top))
    if not all(map(math.isfinite, box)) or not (box[0] < box[1] and box[2] < box[3]):
        raise ValueError(f"{op}: needs finite left < right and bottom < top, got left={left}, right={right}, "
                         f"bottom={bottom}, top={top}")
    name = _param_backend(op, inputs, backend, "nflows_bounded")
    params = _expand(inputs, (unnormalized_widths, unnormalized_heights, unnormalized_derivatives))
    return _rq_spline_op(inputs, *params, bool(inverse), 1.0, mbw, mbh, md, name, "nflows_bounded", *box)


def rq_spline_zuko(
    inputs: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    bound: float = 5.0,
    slope: float = 1e-3,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """zuko's monotonic rational-quadratic spline, elementwise (Durkan et al., 2019).

    Element for element ``zuko.transforms.MonotonicRQSTransform(widths, heights, derivatives,
    bound, slope)``: raw widths and heights soft-bounded as ``w / (1 + |2w / log slope|)`` and
    softmax-normalised (no minimum bin size), interior slopes ``exp(d / (1 + |d / log slope|))``,
    boundary slopes 1, the identity with log-det 0 outside ``[-bound, bound]``. The same fused op
    as :func:`rq_spline` with another prologue.

    Args:
        inputs: ``(...)``.
        widths, heights: ``(..., K)``; derivatives: ``(..., K-1)``; leading dims equal to
            ``inputs.shape`` or broadcastable to it.
        inverse: evaluate the inverse spline.
        bound: the spline's (co)domain bound ``B``.
        slope: the minimum slope, in ``(0, 1)``.
        backend: as for :func:`rq_spline`.

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape``.
    """
    op = "rq_spline_zuko"
    bound, _, _, _ = _check(inputs, widths, heights, derivatives, bound, 0.0, 0.0, 0.0, op=op,
                            names=("widths", "heights", "derivatives"))
    slope = float(slope)
    if not 0.0 < slope < 1.0:
        raise ValueError(f"{op}: slope must be in (0, 1), got {slope}")
    name = _param_backend(op, inputs, backend, "zuko")
    params = _expand(inputs, (widths, heights, derivatives))
    return _rq_spline_op(inputs, *params, bool(inverse), bound, 0.0, 0.0, slope, name, "zuko", -bound, bound, -bound,
                         bound)
