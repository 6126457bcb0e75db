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

import math

import torch

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels._facts import SPLINE_PARAMETERIZATIONS
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference.spline import evaluate
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import CheckMemo, check_bool, check_positive_float, check_same, check_tensor, describe
from fastflow.ops._opdef import define

__all__ = ["rq_spline", "rq_spline_bounded", "rq_spline_zuko", "rq_spline_accepts", "rq_spline_unchecked",
           "PARAMETERIZATIONS", "MAX_BINS"]

OP = "rq_spline"
_MAX_BINS = 1024
# The spline's parameterisations (prologues raw -> knots and slopes, evaluated inside each
# kernel), rows of the one table in kernels/_facts.py: "nflows" (unconstrained, linear tails:
# rq_spline), "nflows_bounded" (rq_spline_bounded), "zuko" (rq_spline_zuko).
PARAMETERIZATIONS = tuple(SPLINE_PARAMETERIZATIONS)



def _box(parameterization, tail_bound, left, right, bottom, top):
    if SPLINE_PARAMETERIZATIONS[parameterization].box == "tail_bound":  # the square [-B, B]^2
        return (-tail_bound, tail_bound, -tail_bound, tail_bound)
    return (left, right, bottom, top)


def _kernel_scalars(parameterization, tail_bound, mbw, mbh, md, left, right, bottom, top, slope):
    """The launchers' ``(box, mbw, mbh, md)``: the row's box, and its minimum slope (zuko's own
    ``slope`` argument, the others' ``min_derivative``) in the one slot the kernels read."""
    md = slope if SPLINE_PARAMETERIZATIONS[parameterization].own_slope else md
    return _box(parameterization, tail_bound, left, right, bottom, top), mbw, mbh, md


# --------------------------------------------------------------------------------------------
# The op (fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these)
# --------------------------------------------------------------------------------------------


def _forward(inputs: torch.Tensor, unnormalized_widths: torch.Tensor, unnormalized_heights: torch.Tensor,
             unnormalized_derivatives: torch.Tensor, inverse: bool, tail_bound: float, min_bin_width: float,
             min_bin_height: float, min_derivative: float, backend: str, parameterization: str = "nflows",
             left: float = -1.0, right: float = 1.0, bottom: float = -1.0, top: float = 1.0, slope: float = 1e-3,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    scalars = _kernel_scalars(parameterization, tail_bound, min_bin_width, min_bin_height, min_derivative, left,
                              right, bottom, top, slope)
    return get_kernel(OP, backend).forward(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                           inverse, parameterization, *scalars)


def _backward(grad_outputs, grad_logabsdet, inputs, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend,
              parameterization="nflows", left=-1.0, right=1.0, bottom=-1.0, top=1.0, slope=1e-3):
    # a fused kernel that recomputes the forward from the inputs (nothing else is saved)
    if inputs.numel() == 0:
        return torch.empty_like(inputs), *(torch.empty_like(p) for p in (uw, uh, ud))
    scalars = _kernel_scalars(parameterization, tail_bound, mbw, mbh, md, left, right, bottom, top, slope)
    return tuple(get_kernel(OP, backend).backward(grad_outputs, grad_logabsdet, inputs, uw, uh, ud, inverse,
                                                  parameterization, *scalars))


def _composite(x, uw, uh, ud, inverse, tail_bound, mbw, mbh, md, backend, parameterization="nflows", left=-1.0,
               right=1.0, bottom=-1.0, top=1.0, slope=1e-3):
    """The spline in differentiable torch ops (the reference)."""
    scalars = _kernel_scalars(parameterization, tail_bound, mbw, mbh, md, left, right, bottom, top, slope)
    out, lad = evaluate(*upcast(x, uw, uh, ud), inverse, parameterization, *scalars)
    return out.to(x.dtype), lad.to(x.dtype)


_INPUTS = ("inputs", "unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives")
_rq_spline_op = define(OP, forward=_forward, outputs=("like:inputs", "like:inputs"), backward=_backward,
                       grads=_INPUTS, composite=_composite)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


_MEMO = CheckMemo()
_NAMES = ("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives")
_ZUKO_NAMES = ("widths", "heights", "derivatives")


def _check(inputs, uw, uh, ud, tail_bound, mbw, mbh, md, op="rq_spline", n_derivs=-1, names=_NAMES):
    if torch.compiler.is_compiling():
        return _check_all(inputs, uw, uh, ud, tail_bound, mbw, mbh, md, op, n_derivs, names)
    key = _MEMO.key((inputs, uw, uh, ud), (tail_bound, mbw, mbh, md, op, n_derivs))
    done = _MEMO.get(key)
    if done is None:
        done = _MEMO.put(key, _check_all(inputs, uw, uh, ud, tail_bound, mbw, mbh, md, op, n_derivs, names))
    return done


def _check_all(inputs, uw, uh, ud, tail_bound, mbw, mbh, md, op, n_derivs, names):
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
        if t.shape[:-1] == inputs.shape:
            continue  # the common case; torch.broadcast_shapes costs microseconds of Python
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
    return _call("nflows", (inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives), inverse,
                 backend, tail_bound, min_bin_width, min_bin_height, min_derivative)


def _call(parameterization, tensors, inverse, backend, tail_bound, mbw, mbh, md, box=None, names=_NAMES,
          slope=None):
    """What every public function does after its signature: autocast, checks, backend, the op."""
    inputs, params, tail_bound, mbw, mbh, md, box, slope = _checked(parameterization, tensors, tail_bound, mbw, mbh,
                                                                    md, box, names, slope)
    op = SPLINE_PARAMETERIZATIONS[parameterization].public
    name = resolve_backend(OP, inputs, backend, parameterization=None if parameterization == "nflows"
                           else parameterization, caller=op)
    params = _expand(inputs, params)
    inverse = check_bool(op, "inverse", inverse)
    return _rq_spline_op(inputs, *params, inverse, tail_bound, mbw, mbh, md, name, parameterization, *box, slope)


def _checked(parameterization, tensors, tail_bound, mbw, mbh, md, box, names=_NAMES, slope=None):
    """The public function's checks: ``(inputs, params, tail_bound, mbw, mbh, md, box, slope)`` or an error."""
    row = SPLINE_PARAMETERIZATIONS[parameterization]
    op = row.public
    inputs, *params = autocast_args(*tensors)  # float32 under autocast
    tail_bound, mbw, mbh, md = _check(inputs, *params, tail_bound, mbw, mbh, md, op, row.n_derivs, names)
    if row.own_slope:  # zuko's minimum slope, its own argument
        slope = float(slope)
        if not 0.0 < slope < 1.0:
            raise ValueError(f"{op}: slope must be in (0, 1), got {slope}")
    else:
        slope = 0.0  # (unused by the row)
    if row.box == "tail_bound":
        return inputs, params, tail_bound, mbw, mbh, md, (-tail_bound, tail_bound, -tail_bound, tail_bound), slope
    box = tuple(v if isinstance(v, torch.SymFloat) else float(v) for v in box)
    # comparisons rather than math.isfinite, which torch.compile cannot trace on a SymFloat
    if not all(v == v and v != math.inf and v != -math.inf for v in box) or not (box[0] < box[1] and box[2] < box[3]):
        raise ValueError(f"{op}: needs finite left < right and bottom < top, got left={box[0]}, right={box[1]}, "
                         f"bottom={box[2]}, top={box[3]}")
    return inputs, params, tail_bound, mbw, mbh, md, box, slope


def _expand(inputs, params):
    # parameters broadcast to inputs' shape are expanded (a view); autograd sums the gradient back
    return [p if p.shape[:-1] == inputs.shape else p.expand(*inputs.shape, p.shape[-1]) for p in params]


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
    return _call("nflows_bounded", (inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives),
                 inverse, backend, 1.0, min_bin_width, min_bin_height, min_derivative, box=(left, right, bottom, top))


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
    return _call("zuko", (inputs, widths, heights, derivatives), inverse, backend, bound, 0.0, 0.0, 0.0,
                 names=_ZUKO_NAMES, slope=slope)


# --------------------------------------------------------------------------------------------
# For callers with a fallback (the peer integrations): the contract as a predicate, and the op
# without the public functions' checks, so that neither copies the argument contract.
# --------------------------------------------------------------------------------------------

MAX_BINS = _MAX_BINS


def rq_spline_accepts(inputs, uw, uh, ud, *, parameterization: str = "nflows", tail_bound: float = 1.0,
                      box=(0.0, 1.0, 0.0, 1.0), min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                      min_derivative: float = 1e-3, slope: float = 1e-3) -> bool:
    """Whether the public function of ``parameterization`` (:func:`rq_spline`,
    :func:`rq_spline_bounded` with ``box = (left, right, bottom, top)``, :func:`rq_spline_zuko`
    with ``tail_bound`` its bound and ``slope`` its slope) would take these arguments: its own
    checks (remembered per shapes and values, so asking is cheap), as a predicate. A caller with
    a fallback of its own asks this, then calls :func:`rq_spline_unchecked`."""
    if parameterization not in SPLINE_PARAMETERIZATIONS:
        raise ValueError(f"rq_spline_accepts: parameterization={parameterization!r}, expected one of "
                         f"{PARAMETERIZATIONS}")
    own = SPLINE_PARAMETERIZATIONS[parameterization].own_slope  # (zuko: no minimum sizes)
    try:
        _checked(parameterization, (inputs, uw, uh, ud), tail_bound, 0.0 if own else min_bin_width,
                 0.0 if own else min_bin_height, 0.0 if own else min_derivative, box, slope=slope)
    except (TypeError, ValueError):
        return False
    return True


def rq_spline_unchecked(inputs, uw, uh, ud, *, parameterization: str = "nflows", inverse: bool = False,
                        tail_bound: float = 1.0, box=(0.0, 1.0, 0.0, 1.0), min_bin_width: float = 1e-3,
                        min_bin_height: float = 1e-3, min_derivative: float = 1e-3, slope: float = 1e-3,
                        backend: str | None = None):
    """The fused spline op of ``parameterization`` without the public functions' argument checks
    (arguments as for :func:`rq_spline_accepts`): for callers that asked
    :func:`rq_spline_accepts` first (the peer integrations, which run the peer's own code where it
    says no). Arguments it would refuse give undefined results here, not a clear error. The
    backend is chosen as by the public functions (a forced one without this parameterisation's
    kernels raises ``BackendUnavailableError``)."""
    row = SPLINE_PARAMETERIZATIONS[parameterization]
    name = resolve_backend(OP, inputs, backend, parameterization=parameterization, caller=row.public)
    tb = float(tail_bound) if row.box == "tail_bound" else 1.0
    mins = (0.0, 0.0, 0.0) if row.own_slope else (float(min_bin_width), float(min_bin_height), float(min_derivative))
    return _rq_spline_op(inputs, *_expand(inputs, (uw, uh, ud)), bool(inverse), tb, *mins, name, parameterization,
                         *_box(parameterization, tb, *map(float, box)), float(slope) if row.own_slope else 0.0)
