"""``fastflow.ops.rq_spline``: the rational-quadratic spline of Neural Spline Flows (Durkan,
Bekasov, Murray & Papamakarios, NeurIPS 2019), in each parameterisation of the table
``kernels/_facts.SPLINE_PARAMETERIZATIONS``: nflows' with linear tails (:func:`rq_spline`) or on
a box (:func:`rq_spline_bounded`), and zuko's (:func:`rq_spline_zuko`). One custom op
``fastflow::rq_spline`` for all, its backward the fused ``fastflow::rq_spline_backward`` that
recomputes the forward from the inputs (nothing else is saved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels._facts import SPLINE_PARAMETERIZATIONS
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference.spline import evaluate
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import CheckMemo, check_bool, check_box, check_elementwise, check_positive_float, describe
from fastflow.ops._opdef import define

__all__ = ["rq_spline", "rq_spline_bounded", "rq_spline_zuko", "rq_spline_accepts", "rq_spline_unchecked",
           "PARAMETERIZATIONS", "MAX_BINS"]

OP = "rq_spline"
MAX_BINS = 1024
PARAMETERIZATIONS = tuple(SPLINE_PARAMETERIZATIONS)


def _options(tail_bound, mbw, mbh, md, backend, parameterization="nflows", left=-1.0, right=1.0, bottom=-1.0, top=1.0,
             slope=1e-3):
    """The op's options as the launchers read them: ``backend, parameterization, box, mbw, mbh,
    md``, with the row's box (the square ``[-B, B]^2`` of ``tail_bound`` or the given one) and its
    minimum slope (zuko's own ``slope``, the others' ``min_derivative``) in the one slot."""
    row = SPLINE_PARAMETERIZATIONS[parameterization]
    box = (-tail_bound, tail_bound, -tail_bound, tail_bound) if row.box == "tail_bound" else (left, right, bottom, top)
    return backend, parameterization, box, mbw, mbh, slope if row.own_slope else md


# The op: fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these.
def _forward(inputs: torch.Tensor, unnormalized_widths: torch.Tensor, unnormalized_heights: torch.Tensor,
             unnormalized_derivatives: torch.Tensor, inverse: bool, tail_bound: float, min_bin_width: float,
             min_bin_height: float, min_derivative: float, backend: str, parameterization: str = "nflows",
             left: float = -1.0, right: float = 1.0, bottom: float = -1.0, top: float = 1.0, slope: float = 1e-3,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    backend, *options = _options(tail_bound, min_bin_width, min_bin_height, min_derivative, backend,
                                 parameterization, left, right, bottom, top, slope)
    return get_kernel(OP, backend).forward(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                           inverse, *options)


def _backward(grad_outputs, grad_logabsdet, inputs, uw, uh, ud, inverse, *options):  # recomputes the forward
    if inputs.numel() == 0:
        return torch.empty_like(inputs), *(torch.empty_like(p) for p in (uw, uh, ud))
    backend, *options = _options(*options)
    return tuple(get_kernel(OP, backend).backward(grad_outputs, grad_logabsdet, inputs, uw, uh, ud, inverse, *options))


def _composite(x, uw, uh, ud, inverse, *options):  # the reference, in differentiable torch ops
    out, lad = evaluate(*upcast(x, uw, uh, ud), inverse, *_options(*options)[1:])
    return out.to(x.dtype), lad.to(x.dtype)


_INPUTS = ("inputs", "unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives")
_rq_spline_op = define(OP, forward=_forward, outputs=("like:inputs", "like:inputs"), backward=_backward,
                       grads=_INPUTS, composite=_composite)

# Public API
_MEMO = CheckMemo()
_SQUARE = (-1.0, 1.0, -1.0, 1.0)  # (a tail_bound row's box: the op makes it [-B, B]^2)
_NAMES = ("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives")


def _checked(parameterization, tensors, tail_bound, mbw, mbh, md, box=_SQUARE, slope=0.0, caller=None):
    """The public function's checks (autocast first; remembered per shapes and values):
    ``(inputs, params, (tail_bound, mbw, mbh, md, box, slope))`` or an error naming ``caller``
    (default: the parameterisation's public function)."""
    inputs, *params = autocast_args(*tensors)  # float32 under autocast
    scalars = (parameterization, tail_bound, mbw, mbh, md, box, slope, caller)
    return inputs, params, _MEMO.check(_check_all, (inputs, *params), scalars)


def _check_all(inputs, uw, uh, ud, parameterization, tail_bound, mbw, mbh, md, box, slope, caller):
    row = SPLINE_PARAMETERIZATIONS[parameterization]
    op, n_derivs = caller or row.public, row.n_derivs
    names = ("widths", "heights", "derivatives") if row.own_slope else _NAMES  # (zuko's names)
    check_elementwise(op, {"inputs": inputs, names[0]: uw, names[1]: uh, names[2]: ud}, dim="bin")
    k = uw.shape[-1]
    if not 2 <= k <= MAX_BINS:  # K=1 is the identity (one bin, unit end slopes): almost surely a shape mistake
        raise ValueError(f"{op}: {names[0]} must have 2..{MAX_BINS} bins in its last dim, got {describe(uw)}")
    if uh.shape[-1] != k:
        raise ValueError(f"{op}: {names[1]} must have K={k} bins in its last dim like {names[0]}, got {describe(uh)}")
    if ud.shape[-1] != k + n_derivs:
        what = "interior knots; boundary slopes are 1" if n_derivs < 0 else "every knot, boundaries included"
        raise ValueError(f"{op}: {names[2]} must have K{n_derivs:+d}={k + n_derivs} entries in its last dim "
                         f"({what}), got {describe(ud)}")
    tail_bound = check_positive_float(op, "tail_bound", tail_bound)
    mbw, mbh, md = (check_positive_float(op, n, v, allow_zero=True) for n, v in
                    (("min_bin_width", mbw), ("min_bin_height", mbh), ("min_derivative", md)))
    for name, v in (("min_bin_width", mbw), ("min_bin_height", mbh)):
        if v * k >= 1.0:
            raise ValueError(f"{op}: {name}={v} times K={k} bins must be < 1")
    if row.own_slope:  # zuko's minimum slope, its own argument
        slope = float(slope)
        if not 0.0 < slope < 1.0:
            raise ValueError(f"{op}: slope must be in (0, 1), got {slope}")
    return tail_bound, mbw, mbh, md, check_box(op, box) if row.box == "box" else _SQUARE, slope


def _call(parameterization, tensors, inverse, backend, tail_bound, mbw, mbh, md, box=_SQUARE, slope=0.0):
    """What every public function does after its signature: autocast, checks, backend, the op."""
    inputs, params, (tail_bound, mbw, mbh, md, box, slope) = _checked(parameterization, tensors, tail_bound, mbw, mbh,
                                                                      md, box, slope)
    op = SPLINE_PARAMETERIZATIONS[parameterization].public
    name = resolve_backend(OP, inputs, backend, parameterization=None if parameterization == "nflows"
                           else parameterization, caller=op)
    inverse = check_bool(op, "inverse", inverse)
    return _rq_spline_op(inputs, *_expand(inputs, params), inverse, tail_bound, mbw, mbh, md, name, parameterization,
                         *box, slope)


def _expand(inputs, params):  # broadcast parameters expanded (a view); autograd sums their gradient back
    return [p if p.shape[:-1] == inputs.shape else p.expand(*inputs.shape, p.shape[-1]) for p in params]


def rq_spline(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
              unnormalized_derivatives: Tensor, *, inverse: bool = False, tail_bound: float = 1.0,
              min_bin_width: float = 1e-3, min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
              backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rational-quadratic spline with linear tails, elementwise (Durkan et al., 2019).

    A drop-in for nflows' ``unconstrained_rational_quadratic_spline(..., tails="linear")``.

    Args:
        inputs: ``(...)`` values to transform.
        unnormalized_widths, unnormalized_heights: ``(..., K)`` raw bin widths and heights
            (softmax-normalised).
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


def rq_spline_bounded(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                      unnormalized_derivatives: Tensor, *, inverse: bool = False, left: float = 0.0,
                      right: float = 1.0, bottom: float = 0.0, top: float = 1.0, min_bin_width: float = 1e-3,
                      min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
                      backend: str | None = None) -> tuple[Tensor, Tensor]:
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


def rq_spline_zuko(inputs: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, *, inverse: bool = False,
                   bound: float = 5.0, slope: float = 1e-3, backend: str | None = None) -> tuple[Tensor, Tensor]:
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
    return _call("zuko", (inputs, widths, heights, derivatives), inverse, backend, bound, 0.0, 0.0, 0.0, slope=slope)


# For callers with a fallback (the peer integrations): the contract as a predicate, and the op
# without the public functions' checks, so that neither copies the argument contract.


def rq_spline_accepts(inputs, uw, uh, ud, *, parameterization: str = "nflows", tail_bound: float = 1.0,
                      box=(0.0, 1.0, 0.0, 1.0), min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                      min_derivative: float = 1e-3, slope: float = 1e-3) -> bool:
    """Whether the public function of ``parameterization`` (:func:`rq_spline`,
    :func:`rq_spline_bounded` with ``box = (left, right, bottom, top)``, :func:`rq_spline_zuko`
    with ``tail_bound`` its bound) would take these arguments: its own (remembered) checks as a
    predicate. A caller with a fallback asks this, then calls :func:`rq_spline_unchecked`."""
    if parameterization not in SPLINE_PARAMETERIZATIONS:
        raise ValueError(f"rq_spline_accepts: parameterization={parameterization!r}, not in {PARAMETERIZATIONS}")
    own = SPLINE_PARAMETERIZATIONS[parameterization].own_slope  # (zuko: no minimum sizes)
    try:
        _checked(parameterization, (inputs, uw, uh, ud), tail_bound, 0.0 if own else min_bin_width,
                 0.0 if own else min_bin_height, 0.0 if own else min_derivative, box, slope)
    except (TypeError, ValueError):
        return False
    return True


def rq_spline_unchecked(inputs, uw, uh, ud, *, parameterization: str = "nflows", inverse: bool = False,
                        tail_bound: float = 1.0, box=(0.0, 1.0, 0.0, 1.0), min_bin_width: float = 1e-3,
                        min_bin_height: float = 1e-3, min_derivative: float = 1e-3, slope: float = 1e-3,
                        backend: str | None = None):
    """The fused spline op of ``parameterization`` without the argument checks (arguments as for
    :func:`rq_spline_accepts`, which callers ask first): arguments it would refuse give undefined
    results here. The backend is chosen as by the public functions (a forced one without this
    parameterisation's kernels raises ``BackendUnavailableError``)."""
    row = SPLINE_PARAMETERIZATIONS[parameterization]
    name = resolve_backend(OP, inputs, backend, parameterization=parameterization, caller=row.public)
    tb = float(tail_bound) if row.box == "tail_bound" else 1.0
    mins = (0.0, 0.0, 0.0) if row.own_slope else (float(min_bin_width), float(min_bin_height), float(min_derivative))
    return _rq_spline_op(inputs, *_expand(inputs, (uw, uh, ud)), bool(inverse), tb, *mins, name, parameterization,
                         *map(float, box), float(slope) if row.own_slope else 0.0)
