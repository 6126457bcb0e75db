"""Pure-torch rational-quadratic spline: the readable oracle for every other backend.

Monotonic rational-quadratic spline of Durkan et al., "Neural Spline Flows" (NeurIPS 2019),
following Gregory & Delbourgo (1982), with linear (identity) tails outside
``[-tail_bound, tail_bound]``. Element for element the same function as nflows'
``unconstrained_rational_quadratic_spline(..., tails="linear")``, except that the inverse clamps a
discriminant that rounding made slightly negative to zero instead of raising.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from fastflow.kernels._facts import SPLINE_PARAMETERIZATIONS
from fastflow.kernels.reference._precision import upcast


def boundary_derivative_logit(min_derivative: float) -> float:
    """The raw value whose ``min_derivative + softplus`` is exactly the boundary slope 1."""
    return math.log(math.expm1(1.0 - min_derivative))


def _knots(unnormalized: torch.Tensor, lo: float, hi: float, min_size: float):
    """Softmax-normalised bin sizes -> knot positions ``(..., K+1)`` and bin sizes ``(..., K)``."""
    k = unnormalized.shape[-1]
    sizes = torch.softmax(unnormalized, dim=-1)
    sizes = min_size + (1.0 - min_size * k) * sizes
    cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0), value=0.0)
    cum = (hi - lo) * cum + lo
    # The end knots are pinned so that the domain is exactly [lo, hi] whatever the rounding.
    cum = torch.cat([torch.full_like(cum[..., :1], lo), cum[..., 1:-1], torch.full_like(cum[..., :1], hi)], -1)
    return cum, cum[..., 1:] - cum[..., :-1]


def _bin_index(knots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the bin holding ``x``: the last knot ``<= x``; ``x == hi`` falls in the last bin."""
    k = knots.shape[-1] - 1
    idx = torch.sum(x[..., None] >= knots[..., :-1], dim=-1) - 1
    return idx.clamp(0, k - 1)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx[..., None])[..., 0]


def rq_spline_reference(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool = False,
    tail_bound: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """nflows' spline (the "nflows" prologue of :func:`rq_spline_param_reference`) or its
    inverse, elementwise; differentiable by autograd.

    Args:
        inputs: ``(...)``.
        unnormalized_widths, unnormalized_heights: ``(..., K)``.
        unnormalized_derivatives: ``(..., K-1)``, the interior knots' slopes before softplus.

    Returns:
        ``(outputs, logabsdet)``, both shaped like ``inputs``; ``logabsdet`` is
        ``log|d out / d in|`` of the direction evaluated.
    """
    b = float(tail_bound)
    return rq_spline_param_reference(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                     inverse, "nflows", (-b, b, -b, b), min_bin_width, min_bin_height, min_derivative)


def rq_spline_reference_backward(
    grad_outputs: torch.Tensor,
    grad_logabsdet: torch.Tensor,
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool = False,
    tail_bound: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic vector-Jacobian product of :func:`rq_spline_reference` (that of
    :func:`rq_spline_param_reference_backward` with the "nflows" prologue)."""
    b = float(tail_bound)
    return rq_spline_param_reference_backward(grad_outputs, grad_logabsdet, inputs, unnormalized_widths,
                                              unnormalized_heights, unnormalized_derivatives, inverse, "nflows",
                                              (-b, b, -b, b), min_bin_width, min_bin_height, min_derivative)


# --------------------------------------------------------------------------------------------
# The parameterisations (prologues of the one spline core below; the table's rows in
# kernels/_facts.SPLINE_PARAMETERIZATIONS)
# --------------------------------------------------------------------------------------------
#
# "nflows": nflows' ``unconstrained_rational_quadratic_spline(..., tails="linear")`` on
#     [-tail_bound, tail_bound]^2: widths and heights ``min + (1 - min*K) softmax(raw)``, the K-1
#     interior slopes ``min_derivative + softplus(raw)`` and boundary slopes ``min_derivative +
#     softplus(boundary_derivative_logit)`` (1 up to rounding), the identity outside.
# "nflows_bounded": nflows' ``rational_quadratic_spline`` on [left, right] x [bottom, top]: widths
#     and heights ``min + (1 - min*K) softmax(raw)``, K+1 knot slopes ``min_derivative +
#     softplus(raw)`` including both boundaries; no tails (the identity outside the box here).
# "zuko": zuko's ``MonotonicRQSTransform(widths, heights, derivatives, bound, slope)``: raw values
#     soft-bounded, ``w / (1 + |2w / log slope|)`` for widths and heights and ``d / (1 + |d /
#     log slope|)`` for the K-1 interior slopes, softmax without a minimum bin size, slopes
#     ``exp(d)`` with unit boundary slopes, the identity with log-det 0 outside [-bound, bound].
#     The launchers' ``min_derivative`` slot holds zuko's ``slope`` (the op's own ``slope``
#     argument: the table row's ``own_slope``).

PARAMETERIZATIONS = tuple(SPLINE_PARAMETERIZATIONS)  # the table's rows; PROLOGUES below has one for each


def soft_clip(raw: torch.Tensor, scale: float) -> torch.Tensor:
    """zuko's soft bound ``raw / (1 + |raw * scale|)`` (``scale = 2 / log slope`` for widths and
    heights, ``1 / log slope`` for slopes); its values lie in ``(-1/|scale|, 1/|scale|)``."""
    return raw / (1 + torch.abs(raw * scale))


def _nflows_raw_slopes(ud: torch.Tensor, min_derivative: float) -> torch.Tensor:
    """nflows' K+1 raw slopes: the interior ones with the boundary logit at both ends."""
    edge = torch.full_like(ud[..., :1], boundary_derivative_logit(min_derivative))
    return torch.cat([edge, ud, edge], -1)


class Prologue(NamedTuple):
    """A parameterisation in the reference: how raw values become the spline's knots and slopes,
    and the chain rule back (one entry of :data:`PROLOGUES` per row of the table).

    Attributes:
        sizes: ``sizes(uw, uh, mbw, mbh, md) -> (vw, vh, mbw, mbh)``: the values the bins'
            softmax normalises and the minimum bin sizes.
        slopes: ``slopes(ud, md) -> (..., K+1)`` the slope at every knot.
        chain: ``chain(g_vw, g_vh, g_slopes, uw, uh, ud, slopes, md) -> (g_uw, g_uh, g_ud)``.
    """

    sizes: Callable
    slopes: Callable
    chain: Callable


def _log_slope_scales(md):
    log_slope = math.log(md)
    return 2.0 / log_slope, 1.0 / log_slope


def _zuko_chain(g_vw, g_vh, g_d, uw, uh, ud, derivs, md):
    # d/dw of w / (1 + |w c|) is 1 / (1 + |w c|)^2; slope = exp(clip(d)) at the interior knots
    c_size, c_slope = _log_slope_scales(md)
    return (g_vw / (1 + torch.abs(uw * c_size)) ** 2, g_vh / (1 + torch.abs(uh * c_size)) ** 2,
            g_d[..., 1:-1] * derivs[..., 1:-1] / (1 + torch.abs(ud * c_slope)) ** 2)


PROLOGUES: dict[str, Prologue] = {
    "nflows": Prologue(
        lambda uw, uh, mbw, mbh, md: (uw, uh, mbw, mbh),
        lambda ud, md: md + F.softplus(_nflows_raw_slopes(ud, md)),
        lambda g_vw, g_vh, g_d, uw, uh, ud, derivs, md: (g_vw, g_vh, g_d[..., 1:-1] * torch.sigmoid(ud))),
    "nflows_bounded": Prologue(
        lambda uw, uh, mbw, mbh, md: (uw, uh, mbw, mbh),
        lambda ud, md: md + F.softplus(ud),
        lambda g_vw, g_vh, g_d, uw, uh, ud, derivs, md: (g_vw, g_vh, g_d * torch.sigmoid(ud))),
    "zuko": Prologue(
        lambda uw, uh, mbw, mbh, md: (soft_clip(uw, _log_slope_scales(md)[0]),
                                      soft_clip(uh, _log_slope_scales(md)[0]), 0.0, 0.0),
        lambda ud, md: torch.exp(F.pad(soft_clip(ud, _log_slope_scales(md)[1]), (1, 1), value=0.0)),
        _zuko_chain),
}


def _prologue(parameterization: str) -> Prologue:
    try:
        return PROLOGUES[parameterization]
    except KeyError:
        raise ValueError(f"unknown spline parameterization {parameterization!r}; expected one of "
                         f"{tuple(PROLOGUES)}") from None


def spline_prologue(
    parameterization: str,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    box: tuple[float, float, float, float],
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
):
    """Raw parameters -> knots ``cw, ch (..., K+1)``, bin sizes ``(..., K)`` and the K+1 knot
    slopes ``(..., K+1)`` of ``parameterization`` (its entry in :data:`PROLOGUES`)."""
    left, right, bottom, top = box
    p = _prologue(parameterization)
    vw, vh, mbw, mbh = p.sizes(unnormalized_widths, unnormalized_heights, min_bin_width, min_bin_height,
                               min_derivative)
    cw, widths = _knots(vw, left, right, mbw)
    ch, heights = _knots(vh, bottom, top, mbh)
    return cw, widths, ch, heights, p.slopes(unnormalized_derivatives, min_derivative)


def rq_spline_param_reference(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool,
    parameterization: str,
    box: tuple[float, float, float, float],
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline of ``parameterization`` (see :func:`spline_prologue`) or its inverse,
    elementwise and differentiable by autograd; the identity with log-det 0 outside
    ``[left, right]`` (forward) or ``[bottom, top]`` (inverse), ``box = (left, right, bottom, top)``."""
    cw, widths, ch, heights, derivs = spline_prologue(
        parameterization, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, box,
        min_bin_width, min_bin_height, min_derivative)
    lo, hi = (box[2], box[3]) if inverse else (box[0], box[1])
    inside = (inputs >= lo) & (inputs <= hi)
    # Outside elements are evaluated at an inside point and discarded (no NaN through torch.where).
    x = torch.where(inside, inputs, torch.full_like(inputs, 0.5 * (lo + hi)))
    idx = _bin_index(ch if inverse else cw, x)
    xk, wk = _gather(cw, idx), _gather(widths, idx)
    yk, hk = _gather(ch, idx), _gather(heights, idx)
    dk, dk1 = _gather(derivs[..., :-1], idx), _gather(derivs[..., 1:], idx)
    s = hk / wk
    sum_d = dk + dk1 - 2 * s
    if not inverse:
        theta = (x - xk) / wk
        t = theta * (1 - theta)
        den = s + sum_d * t
        out = yk + hk * (s * theta**2 + dk * t) / den
    else:
        dy = x - yk
        qa = hk * (s - dk) + dy * sum_d
        qb = hk * dk - dy * sum_d
        qc = -s * dy
        disc = torch.clamp(qb**2 - 4 * qa * qc, min=0.0)
        theta = (2 * qc) / (-qb - torch.sqrt(disc))
        t = theta * (1 - theta)
        den = s + sum_d * t
        out = xk + theta * wk
    num = s**2 * (dk1 * theta**2 + 2 * s * t + dk * (1 - theta) ** 2)
    lad = torch.log(num) - 2 * torch.log(den)
    if inverse:
        lad = -lad
    out = torch.where(inside, out, inputs)
    lad = torch.where(inside, lad, torch.where(torch.isnan(inputs), inputs, torch.zeros_like(lad)))
    return out, lad


def rq_spline_param_reference_backward(
    grad_outputs: torch.Tensor,
    grad_logabsdet: torch.Tensor,
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool,
    parameterization: str,
    box: tuple[float, float, float, float],
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic vector-Jacobian product of :func:`rq_spline_param_reference` (the derivation of
    :func:`rq_spline_reference_backward`, chained through the parameterisation's prologue)."""
    left, right, bottom, top = box
    lo, hi = (bottom, top) if inverse else (left, right)
    x0 = inputs
    inside = (x0 >= lo) & (x0 <= hi)
    x = torch.where(inside, x0, torch.full_like(x0, 0.5 * (lo + hi)))
    go = torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs))
    gl = torch.where(inside, grad_logabsdet, torch.zeros_like(grad_logabsdet))
    k = unnormalized_widths.shape[-1]
    p = _prologue(parameterization)
    vw, vh, mbw, mbh = p.sizes(unnormalized_widths, unnormalized_heights, min_bin_width, min_bin_height,
                               min_derivative)
    pw, ph = torch.softmax(vw, dim=-1), torch.softmax(vh, dim=-1)
    cw, widths, ch, heights, derivs = spline_prologue(
        parameterization, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, box,
        min_bin_width, min_bin_height, min_derivative)
    idx = _bin_index(ch if inverse else cw, x)
    xk, wk = _gather(cw, idx), _gather(widths, idx)
    hk = _gather(heights, idx)
    dk, dk1 = _gather(derivs[..., :-1], idx), _gather(derivs[..., 1:], idx)
    s = hk / wk
    if inverse:
        out, _ = rq_spline_param_reference(x, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                           True, parameterization, box, min_bin_width, min_bin_height, min_derivative)
        theta = (out - xk) / wk
    else:
        theta = (x - xk) / wk

    t = theta * (1 - theta)
    omt = 1 - theta
    om2 = 1 - 2 * theta
    sd = dk + dk1 - 2 * s
    den = s + sd * t
    nn = s * theta**2 + dk * t
    mm = dk1 * theta**2 + 2 * s * t + dk * omt**2
    dy_dth = hk * ((2 * s * theta + dk * om2) * den - nn * sd * om2) / den**2
    dy_ds = hk * (theta**2 * den - nn * (1 - 2 * t)) / den**2
    dy_dhk = nn / den
    dy_ddk = hk * t * (den - nn) / den**2
    dy_ddk1 = -hk * nn * t / den**2
    dl_dth = (2 * dk1 * theta + 2 * s * om2 - 2 * dk * omt) / mm - 2 * sd * om2 / den
    dl_ds = 2 / s + 2 * t / mm - 2 * (1 - 2 * t) / den
    dl_ddk = omt**2 / mm - 2 * t / den
    dl_ddk1 = theta**2 / mm - 2 * t / den
    if inverse:
        g_in = (go - gl * dl_dth / wk) * wk / dy_dth
        a, c = -g_in, -gl
    else:
        a, c = go, gl
        g_in = (a * dy_dth + c * dl_dth) / wk
    g_th = a * dy_dth + c * dl_dth
    g_s = a * dy_ds + c * dl_ds
    g_wk = -(g_th * theta + g_s * s) / wk
    g_hk = a * dy_dhk + g_s / wk

    cols = torch.arange(k, device=x.device)

    def knot_grads(p, scale, g_lo, g_hi):
        # knot j = lo + (hi - lo) * sum_{i<j} size_i for 0 < j < k; the end knots are constants.
        glo = torch.where(idx >= 1, g_lo, torch.zeros_like(g_lo)) * scale
        ghi = torch.where(idx + 1 <= k - 1, g_hi, torch.zeros_like(g_hi)) * scale
        gp = (cols < idx[..., None]) * glo[..., None] + (cols <= idx[..., None]) * ghi[..., None]
        return p * (gp - (p * gp).sum(-1, keepdim=True))

    g_uw = knot_grads(pw, (right - left) * (1 - mbw * k), -g_th / wk - g_wk, g_wk)
    g_uh = knot_grads(ph, (top - bottom) * (1 - mbh * k), a - g_hk, g_hk)
    g_dk = a * dy_ddk + c * dl_ddk
    g_dk1 = a * dy_ddk1 + c * dl_ddk1
    g_d = torch.zeros_like(derivs)
    g_d = g_d.scatter_add(-1, idx[..., None], g_dk[..., None]).scatter_add(-1, idx[..., None] + 1, g_dk1[..., None])
    g_uw, g_uh, g_ud = p.chain(g_uw, g_uh, g_d, unnormalized_widths, unnormalized_heights,
                               unnormalized_derivatives, derivs, min_derivative)

    mask = inside[..., None]
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    g_in = torch.where(inside, g_in, grad_outputs)
    return g_in, torch.where(mask, g_uw, zero), torch.where(mask, g_uh, zero), torch.where(mask, g_ud, zero)


# --------------------------------------------------------------------------------------------
# The launcher interface every kernels/<backend>/spline.py implements (tensors of one dtype and
# device, of any layout, in; new contiguous tensors out): x (...), uw, uh (..., K), ud (..., K-1)
# or (..., K+1), the parameters' leading shape that of x (possibly expanded, stride 0); outputs
# and gradients have their input's shape. Flattening to rows is the backend's business
# (flat_rows below), so a backend that can take the shapes as they are skips it:
#   PARAMETERIZATIONS: the prologues this backend has kernels for
#   forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md) -> (out, lad)
#   backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md)
#       -> (g_x, g_uw, g_uh, g_ud)
# box = (left, right, bottom, top); "nflows" uses (-tail_bound, tail_bound, -tail_bound,
# tail_bound) and "zuko" (-bound, bound, -bound, bound); md is the row's minimum slope (zuko's
# own slope argument, which the op passes here).
# --------------------------------------------------------------------------------------------


def evaluate(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    """The spline in differentiable torch ops, in the dtype of the inputs (no upcast)."""
    return rq_spline_param_reference(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md)


def flat_rows(x, uw, uh, ud):
    """The launcher's inputs as contiguous rows: x (N,), uw, uh (N, K), ud (N, K-1 or K+1)."""
    return (x.reshape(-1).contiguous(), uw.reshape(-1, uw.shape[-1]).contiguous(),
            uh.reshape(-1, uh.shape[-1]).contiguous(), ud.reshape(-1, ud.shape[-1]).contiguous())


def forward(x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    out, lad = evaluate(*upcast(x, uw, uh, ud), inverse, parameterization, box, mbw, mbh, md)
    return out.to(x.dtype).contiguous(), lad.to(x.dtype).contiguous()


def backward(g_out, g_lad, x, uw, uh, ud, inverse, parameterization, box, mbw, mbh, md):
    ts = upcast(g_out, g_lad, x, uw, uh, ud)
    grads = rq_spline_param_reference_backward(*ts, inverse, parameterization, box, mbw, mbh, md)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, uw, uh, ud)))
