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

import torch

from fastflow.backends import get_kernel, register_kernel, resolve_backend
from fastflow.ops._checks import check_positive_float, check_same, check_tensor, describe
from fastflow.ops._dispatch import custom_op

__all__ = ["rq_spline"]

OP = "rq_spline"
_MAX_BINS = 1024


# --------------------------------------------------------------------------------------------
# Per-backend adapters: flat contiguous tensors in, flat tensors out.
#   fwd(x (N,), uw (N,K), uh (N,K), ud (N,K-1), inverse, tb, mbw, mbh, md) -> (out, lad)
#   bwd(g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md) -> (g_x, g_uw, g_uh, g_ud)
# --------------------------------------------------------------------------------------------


class _Reference:
    @staticmethod
    def _upcast(ts):
        # Evaluated in float64 on the CPU (so that the oracle is at least as accurate as any
        # float32 kernel) and half precision in float32 elsewhere; rounded once at the end.
        cpu = ts[0].device.type == "cpu"
        return [t.double() if cpu else (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t) for t in ts]

    @classmethod
    def fwd(cls, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
        from fastflow.kernels.reference.spline import rq_spline_reference

        out, lad = rq_spline_reference(*cls._upcast([x, uw, uh, ud]), inverse, tb, mbw, mbh, md)
        return out.to(x.dtype), lad.to(x.dtype)

    @classmethod
    def bwd(cls, g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
        from fastflow.kernels.reference.spline import rq_spline_reference_backward

        grads = rq_spline_reference_backward(*cls._upcast([g_out, g_lad, x, uw, uh, ud]), inverse, tb, mbw, mbh, md)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (x, uw, uh, ud)))


class _Numba:
    @staticmethod
    def fwd(x, uw, uh, ud, inverse, tb, mbw, mbh, md):
        from fastflow.kernels.numba.spline import rq_spline_fwd

        out, lad = rq_spline_fwd(*(t.numpy() for t in (x, uw, uh, ud)), inverse, tb, mbw, mbh, md)
        return torch.from_numpy(out), torch.from_numpy(lad)

    @staticmethod
    def bwd(g_out, g_lad, x, uw, uh, ud, inverse, tb, mbw, mbh, md):
        from fastflow.kernels.numba.spline import rq_spline_bwd

        arrays = (t.numpy() for t in (g_out, g_lad, x, uw, uh, ud))
        return tuple(torch.from_numpy(g) for g in rq_spline_bwd(*arrays, inverse, tb, mbw, mbh, md))


def _load_triton():
    from fastflow.kernels.triton import spline

    return spline


def _load_cuda():
    from fastflow.kernels.cuda import spline

    return spline


register_kernel(OP, "reference", lambda: _Reference)
register_kernel(OP, "numba", lambda: _Numba)
register_kernel(OP, "triton", _load_triton)
register_kernel(OP, "cuda", _load_cuda)


def _flat(x, uw, uh, ud):
    k = uw.shape[-1]
    return (
        x.reshape(-1).contiguous(),
        uw.reshape(-1, k).contiguous(),
        uh.reshape(-1, k).contiguous(),
        ud.reshape(-1, k - 1).contiguous(),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    flat = _flat(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
    kern = get_kernel(OP, backend)
    out, lad = kern.fwd(*flat, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative)
    return out.view(inputs.shape), lad.view(inputs.shape)


@_rq_spline_op.register_fake
def _(inputs, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
    if inputs.numel() == 0:
        return torch.empty_like(inputs), *(torch.empty_like(p) for p in params)
    flat = _flat(inputs, *params)
    g_out = grad_outputs.reshape(-1).contiguous()
    g_lad = grad_logabsdet.reshape(-1).contiguous()
    kern = get_kernel(OP, backend)
    g = kern.bwd(g_out, g_lad, *flat, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative)
    return g[0].view(inputs.shape), *(gi.view(p.shape) for gi, p in zip(g[1:], params))


@_rq_spline_backward_op.register_fake
def _(g_out, g_lad, inputs, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (inputs, uw, uh, ud))


def _setup_context(ctx, inputs, output):
    x, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend = inputs
    ctx.save_for_backward(x, uw, uh, ud)
    ctx.args = (inverse, tail_bound, mbw, mbh, md, backend)


def _backward(ctx, grad_out, grad_lad):
    x, uw, uh, ud = ctx.saved_tensors
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out
    grad_lad = torch.zeros_like(x) if grad_lad is None else grad_lad
    g = _rq_spline_backward_op(grad_out, grad_lad, x, uw, uh, ud, *ctx.args)
    return (*g, None, None, None, None, None, None)


def _composite(x, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend):
    """The spline in differentiable torch ops (the reference), for double backward."""
    from fastflow.kernels.reference.spline import rq_spline_reference

    out, lad = rq_spline_reference(*_Reference._upcast([x, uw, uh, ud]), inverse, tail_bound, mbw, mbh, md)
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


def _check(inputs, uw, uh, ud, tail_bound, mbw, mbh, md):
    op = "rq_spline"
    named = {
        "inputs": inputs,
        "unnormalized_widths": uw,
        "unnormalized_heights": uh,
        "unnormalized_derivatives": ud,
    }
    for name, t in named.items():
        check_tensor(name, t, op=op)
    check_same(op, named)
    for name, t in list(named.items())[1:]:
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} needs a trailing bin dimension, got {describe(t)}")
    k = uw.shape[-1]
    if not 2 <= k <= _MAX_BINS:
        # K=1 is the identity (one bin, unit end slopes): almost surely a shape mistake.
        raise ValueError(f"{op}: unnormalized_widths must have 2..{_MAX_BINS} bins in its last dim, got {describe(uw)}")
    if uh.shape[-1] != k:
        raise ValueError(
            f"{op}: unnormalized_heights must have K={k} bins in its last dim like unnormalized_widths, got {describe(uh)}"
        )
    if ud.shape[-1] != k - 1:
        raise ValueError(
            f"{op}: unnormalized_derivatives must have K-1={k - 1} entries in its last dim "
            f"(interior knots; boundary slopes are 1), got {describe(ud)}"
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
