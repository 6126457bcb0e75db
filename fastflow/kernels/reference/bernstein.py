"""The ``reference`` backend's Bernstein polynomial law: the readable pure-torch oracle of the op
``fastflow::bernstein`` (``fastflow/ops/bernstein.py``) and the derivation its kernels follow.

Element for element zuko 1.6's ``BoundedBernsteinTransform(theta, bound)``, the law of zuko's
``BPF`` and sbi's ``zuko_bpf``. Sick et al., "Deep transformation models" (2020); Arpogaus et
al., "Bernstein-Polynomial Normalizing Flows" (2022).

With ``x' = (x + B) / (2B)``, the map is the Bernstein polynomial of degree ``M``

    f(x') = sum_i C(M, i) x'^i (1 - x')^(M - i) theta_i

on ``eps < x' < 1 - eps``, whose increasing coefficients come from ``n`` raw values: with
``d = 2B / (n + 4)``, the steps ``(d, d, softmax(raw) * (2B - 4d), d, d)`` cumulated from
``-B``, so ``theta_0 = -B``, ``theta_M = B`` (``M = n + 4``) and the polynomial has slope 1 and
curvature 0 at both ends. Outside, the map is linear with slope 1 from ``-B`` and ``B``
(zuko's offsets): ``y = 2B (x' - eps) - B`` below, ``y = 2B (x' - 1 + eps) + B`` above. As in
zuko, the inside and outside pieces do not meet exactly at ``x' = eps``: they differ by about
``2B eps`` (the polynomial at ``eps`` against zuko's offset ``-B``).

The inverse solves ``f(x') = y`` on ``[eps, 1 - eps]`` by bisection to the dtype's resolution
(zuko bisects ``ceil(log2(2B / eps))`` times, to about ``eps``), and is linear outside
``[-B, B]``.

The gradients (:func:`vjp`), with ``Delta`` the ``M`` steps between the coefficients and
``b^k_i`` the degree-``k`` basis at ``t``: ``f' = M sum_i b^(M-1)_i Delta_i``, ``f'' = M (M-1)
sum_i b^(M-2)_i (Delta_(i+1) - Delta_i)``; ``dy/dDelta_i = sum_(k>i) b^M_k`` (a tail sum) and
``d log f'/dDelta_i = M b^(M-1)_i / f'``; then the softmax's chain rule for the ``n`` middle
steps. The inverse's follow from the implicit function: ``dt/dy = 1/f'``, ``dt/dDelta_i =
-(dy/dDelta_i)/f'``.
"""

from __future__ import annotations

import math

import torch

from fastflow.kernels.reference._precision import upcast

__all__ = ["constrain", "bernstein", "bernstein_inverse", "bernstein_inverse_differentiable", "evaluate", "vjp",
           "forward", "backward", "EPS", "MAX_PARAMS"]

EPS = 1e-6  # zuko's: the polynomial is used on eps < x' < 1 - eps
MAX_PARAMS = 507  # raw values per element: degree M = n + 4 <= 511 (binomials exact in float64)


def _steps(raw: torch.Tensor, bound: float):
    """``(Delta, s, c)``: the ``M = n + 4`` steps ``(d, d, c * s, d, d)`` between the
    coefficients, the softmax ``s`` of the raw values and its scale ``c = 2B - 4d``."""
    d = 2.0 * bound / (raw.shape[-1] + 4)
    s = torch.softmax(raw, dim=-1)
    edge = torch.full_like(raw[..., :2], d)
    return torch.cat([edge, s * (2.0 * bound - 4.0 * d), edge], -1), s, 2.0 * bound - 4.0 * d


def constrain(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``(..., n)`` raw values -> the ``(..., n + 5)`` increasing coefficients ``theta``."""
    d = 2.0 * bound / (raw.shape[-1] + 4)
    steps = torch.softmax(raw, dim=-1) * (2.0 * bound - 4.0 * d)
    edge = torch.full_like(raw[..., :2], d)
    return torch.cumsum(torch.cat([torch.full_like(raw[..., :1], -bound), edge, steps, edge], -1), -1)


def _basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """``(..., degree + 1)`` Bernstein basis polynomials at ``t`` (elementwise, ``0 < t < 1``)."""
    i = torch.arange(degree + 1, dtype=t.dtype, device=t.device)
    binom = torch.tensor([math.comb(degree, k) for k in range(degree + 1)], dtype=t.dtype, device=t.device)
    t = t[..., None]
    return binom * t**i * (1 - t) ** (degree - i)


def _poly(t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``f(t)`` of the polynomial with coefficients ``theta`` (``(..., M + 1)``)."""
    return (_basis(t, theta.shape[-1] - 1) * theta).sum(-1)


def _poly_and_slope(t: torch.Tensor, theta: torch.Tensor):
    """``f(t)`` and ``df/dt``."""
    m = theta.shape[-1] - 1
    return _poly(t, theta), m * (_basis(t, m - 1) * (theta[..., 1:] - theta[..., :-1])).sum(-1)


def bernstein(x: torch.Tensor, raw: torch.Tensor, bound: float = 5.0, eps: float = 1e-6):
    """``(y, log|dy/dx|)`` elementwise: ``x (...)``, ``raw (..., n)`` with ``n >= 1``;
    differentiable by autograd. A NaN input gives NaN in both."""
    theta = constrain(raw, bound)
    t = (x + bound) / (2.0 * bound)
    below, above = t <= eps, t >= 1 - eps
    inside = ~(below | above)
    y_in, slope = _poly_and_slope(torch.where(inside, t, torch.full_like(t, 0.5)), theta)
    y = torch.where(below, 2.0 * bound * (t - eps) - bound,
                    torch.where(above, 2.0 * bound * (t - 1 + eps) + bound, y_in))
    lad = torch.where(inside, torch.log(slope) - math.log(2.0 * bound), torch.zeros_like(t))
    return y, torch.where(torch.isnan(x), x, lad)


def _root(y: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``t`` in ``[eps, 1 - eps]`` with ``f(t) = y`` (clamped to the ends), by bisection to the
    dtype's resolution: each step halves ``[lo, hi]`` (``f`` increases)."""
    lo = torch.full_like(y, eps)
    hi = torch.full_like(y, 1 - eps)
    for _ in range(int(-math.log2(torch.finfo(y.dtype).eps)) + 8):
        mid = 0.5 * (lo + hi)
        go_up = _poly(mid, theta) < y
        lo = torch.where(go_up, mid, lo)
        hi = torch.where(go_up, hi, mid)
    return 0.5 * (lo + hi)


def bernstein_inverse(y: torch.Tensor, raw: torch.Tensor, bound: float = 5.0, eps: float = 1e-6):
    """``(x, log|dx/dy|)``, the inverse of :func:`bernstein` (values only; differentiable:
    :func:`bernstein_inverse_differentiable`)."""
    theta = constrain(raw, bound)
    below, above = y <= -bound, y >= bound
    t = _root(torch.where(below | above, torch.zeros_like(y), y), theta, eps)
    _, slope = _poly_and_slope(t, theta)
    x_in = t * 2.0 * bound - bound
    x_below = ((y + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
    x_above = ((y - bound) / (2.0 * bound) - eps + 1) * 2.0 * bound - bound
    x = torch.where(below, x_below, torch.where(above, x_above, x_in))
    lad = torch.where(below | above, torch.zeros_like(y), -(torch.log(slope) - math.log(2.0 * bound)))
    return torch.where(torch.isnan(y), y, x), torch.where(torch.isnan(y), y, lad)


def bernstein_inverse_differentiable(y: torch.Tensor, raw: torch.Tensor, bound: float = 5.0, eps: float = 1e-6):
    """:func:`bernstein_inverse` in differentiable ops (the op's composite): the root found
    without gradient, then two Newton steps from it carry the implicit function's first and
    second derivatives (one step gets only the first right); the value stays the root's."""
    theta = constrain(raw, bound)
    below, above = y <= -bound, y >= bound
    inside = ~(below | above)
    target = torch.where(inside, y, torch.zeros_like(y))
    with torch.no_grad():
        t0 = _root(target.detach(), theta.detach(), eps)
    t = t0
    for _ in range(2):
        f, slope = _poly_and_slope(t, theta)
        t = t - (f - target) / slope
    t = t0 + (t - t.detach())
    _, slope = _poly_and_slope(t, theta)
    x_below = ((y + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
    x_above = ((y - bound) / (2.0 * bound) - eps + 1) * 2.0 * bound - bound
    x = torch.where(below, x_below, torch.where(above, x_above, t * 2.0 * bound - bound))
    lad = torch.where(inside, math.log(2.0 * bound) - torch.log(slope), torch.zeros_like(y))
    return torch.where(torch.isnan(y), y, x), torch.where(torch.isnan(y), y, lad)


def evaluate(x, raw, inverse: bool, bound: float):
    """The law in differentiable torch ops: the forward or the inverse."""
    return (bernstein_inverse_differentiable if inverse else bernstein)(x, raw, bound, EPS)


def vjp(g_out, g_lad, z, raw, inverse: bool, bound: float, eps: float = EPS):
    """Analytic vector-Jacobian product of :func:`evaluate` (the derivation in the module
    docstring): gradients for ``z`` (the input, ``x`` or ``y``) and ``raw``."""
    m = raw.shape[-1] + 4
    delta, s, c = _steps(raw, bound)
    theta = -bound + torch.cumsum(torch.cat([torch.zeros_like(delta[..., :1]), delta], -1), -1)
    if inverse:
        inside = (z > -bound) & (z < bound)
        t = _root(torch.where(inside, z, torch.zeros_like(z)), theta, eps)
    else:
        t = (z + bound) / (2.0 * bound)
        inside = (t > eps) & (t < 1 - eps)
    t = torch.where(inside, t, torch.full_like(t, 0.5))
    b1 = _basis(t, m - 1)
    fp = m * (b1 * delta).sum(-1)
    fpp = m * (m - 1) * (_basis(t, m - 2) * (delta[..., 1:] - delta[..., :-1])).sum(-1)
    bm = _basis(t, m)
    dy = torch.flip(torch.cumsum(torch.flip(bm, (-1,)), -1), (-1,))[..., 1:]  # dy/dDelta_i = sum_(k>i) b^M_k
    dlad = m * b1 / fp[..., None]  # d log f' / dDelta_i
    if inverse:
        dt = -dy / fp[..., None]
        g_z = g_out * 2.0 * bound / fp - g_lad * fpp / fp**2
        g_delta = (g_out * 2.0 * bound)[..., None] * dt - g_lad[..., None] * (dlad + (fpp / fp)[..., None] * dt)
    else:
        g_z = g_out * fp / (2.0 * bound) + g_lad * fpp / (fp * 2.0 * bound)
        g_delta = g_out[..., None] * dy + g_lad[..., None] * dlad
    g_s = c * g_delta[..., 2 : m - 2]
    g_raw = s * (g_s - (g_s * s).sum(-1, keepdim=True))
    return torch.where(inside, g_z, g_out), torch.where(inside[..., None], g_raw, torch.zeros_like(g_raw))


# The launcher interface of kernels/<backend>/bernstein.py: shaped tensors in, ``(y, logabsdet)``
# or the gradients ``(x, theta)`` out, in the inputs' dtype.

def forward(x, raw, inverse, bound):
    xx, rr = upcast(x, raw)
    out, lad = (bernstein_inverse if inverse else bernstein)(xx, rr, bound, EPS)
    return out.to(x.dtype).contiguous(), lad.to(x.dtype).contiguous()


def backward(g_out, g_lad, x, raw, inverse, bound):
    grads = vjp(*upcast(g_out, g_lad, x, raw), inverse, bound)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, raw)))
