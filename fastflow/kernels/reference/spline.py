"""Pure-torch rational-quadratic spline: the readable oracle for every other backend.

Monotonic rational-quadratic spline of Durkan et al., "Neural Spline Flows" (NeurIPS 2019),
following Gregory & Delbourgo (1982), with linear (identity) tails outside
``[-tail_bound, tail_bound]``. Element for element the same function as nflows'
``unconstrained_rational_quadratic_spline(..., tails="linear")``, except that the inverse clamps a
discriminant that rounding made slightly negative to zero instead of raising.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    """Evaluate the spline (or its inverse) elementwise; differentiable by autograd.

    Args:
        inputs: ``(...)``.
        unnormalized_widths, unnormalized_heights: ``(..., K)``.
        unnormalized_derivatives: ``(..., K-1)``, the interior knots' slopes before softplus.

    Returns:
        ``(outputs, logabsdet)``, both shaped like ``inputs``; ``logabsdet`` is
        ``log|d out / d in|`` of the direction evaluated.
    """
    b = float(tail_bound)
    inside = (inputs >= -b) & (inputs <= b)
    # Outside elements are evaluated at 0 (any inside point) and discarded, so that no
    # out-of-domain arithmetic can produce NaN gradients through torch.where.
    x = torch.where(inside, inputs, torch.zeros_like(inputs))

    cw, widths = _knots(unnormalized_widths, -b, b, min_bin_width)
    ch, heights = _knots(unnormalized_heights, -b, b, min_bin_height)
    edge = torch.full_like(unnormalized_derivatives[..., :1], boundary_derivative_logit(min_derivative))
    derivs = min_derivative + F.softplus(torch.cat([edge, unnormalized_derivatives, edge], -1))

    idx = _bin_index(ch if inverse else cw, x)
    xk, wk = _gather(cw, idx), _gather(widths, idx)
    yk, hk = _gather(ch, idx), _gather(heights, idx)
    dk, dk1 = _gather(derivs[..., :-1], idx), _gather(derivs[..., 1:], idx)
    s = hk / wk

    if not inverse:
        theta = (x - xk) / wk
        t = theta * (1 - theta)
        den = s + (dk + dk1 - 2 * s) * t
        out = yk + hk * (s * theta**2 + dk * t) / den
    else:
        # Solve the quadratic a*theta^2 + b*theta + c = 0 for the root in [0, 1], in the
        # cancellation-free form 2c / (-b - sqrt(b^2 - 4ac)).
        dy = x - yk
        sum_d = dk + dk1 - 2 * s
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
    # Identity outside the tails; a NaN input gets a NaN log-det too (it has no defined slope).
    lad = torch.where(inside, lad, torch.where(torch.isnan(inputs), inputs, torch.zeros_like(lad)))
    return out, lad


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
    """Analytic vector-Jacobian product of :func:`rq_spline_reference`, in torch ops.

    The same derivation the fused kernels implement (and tested against autograd of the forward):
    partials of ``y = y_k + h_k N/den`` and ``lad = log(s^2 M) - 2 log(den)`` in the bin's local
    quantities, chained through the knots' cumsum and softmax; for the inverse, the implicit
    function theorem. Returns gradients for inputs, widths, heights and derivatives.
    """
    b = float(tail_bound)
    x0 = inputs
    inside = (x0 >= -b) & (x0 <= b)
    x = torch.where(inside, x0, torch.zeros_like(x0))
    go = torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs))
    gl = torch.where(inside, grad_logabsdet, torch.zeros_like(grad_logabsdet))
    k = unnormalized_widths.shape[-1]

    pw = torch.softmax(unnormalized_widths, dim=-1)
    ph = torch.softmax(unnormalized_heights, dim=-1)
    cw, widths = _knots(unnormalized_widths, -b, b, min_bin_width)
    ch, heights = _knots(unnormalized_heights, -b, b, min_bin_height)
    edge = torch.full_like(unnormalized_derivatives[..., :1], boundary_derivative_logit(min_derivative))
    raw_d = torch.cat([edge, unnormalized_derivatives, edge], -1)
    derivs = min_derivative + F.softplus(raw_d)
    idx = _bin_index(ch if inverse else cw, x)
    xk, wk = _gather(cw, idx), _gather(widths, idx)
    yk, hk = _gather(ch, idx), _gather(heights, idx)
    dk, dk1 = _gather(derivs[..., :-1], idx), _gather(derivs[..., 1:], idx)
    s = hk / wk
    if inverse:
        out, _ = rq_spline_reference(x, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                     True, tail_bound, min_bin_width, min_bin_height, min_derivative)
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
    scale_w = 2 * b * (1 - min_bin_width * k)
    scale_h = 2 * b * (1 - min_bin_height * k)

    def knot_grads(p, scale, g_lo, g_hi):
        # knot j = 2b*sum_{i<j} size_i - b for 0 < j < k; the end knots are constants.
        glo = torch.where(idx >= 1, g_lo, torch.zeros_like(g_lo)) * scale
        ghi = torch.where(idx + 1 <= k - 1, g_hi, torch.zeros_like(g_hi)) * scale
        gp = (cols < idx[..., None]) * glo[..., None] + (cols <= idx[..., None]) * ghi[..., None]
        return p * (gp - (p * gp).sum(-1, keepdim=True))

    g_uw = knot_grads(pw, scale_w, -g_th / wk - g_wk, g_wk)
    g_uh = knot_grads(ph, scale_h, a - g_hk, g_hk)
    sig = torch.sigmoid(raw_d)
    g_dk = (a * dy_ddk + c * dl_ddk) * _gather(sig[..., :-1], idx)
    g_dk1 = (a * dy_ddk1 + c * dl_ddk1) * _gather(sig[..., 1:], idx)
    g_raw = torch.zeros_like(raw_d)
    g_raw = g_raw.scatter_add(-1, idx[..., None], g_dk[..., None]).scatter_add(-1, idx[..., None] + 1, g_dk1[..., None])
    g_ud = g_raw[..., 1:-1]

    mask = inside[..., None]
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    g_in = torch.where(inside, g_in, grad_outputs)
    return g_in, torch.where(mask, g_uw, zero), torch.where(mask, g_uh, zero), torch.where(mask, g_ud, zero)
