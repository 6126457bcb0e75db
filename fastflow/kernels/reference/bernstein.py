"""Pure-torch Bernstein polynomial law: the readable oracle for the fused kernels to come (issue 29).

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
"""

from __future__ import annotations

import math

import torch

__all__ = ["constrain", "bernstein", "bernstein_inverse"]


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


def bernstein_inverse(y: torch.Tensor, raw: torch.Tensor, bound: float = 5.0, eps: float = 1e-6):
    """``(x, log|dx/dy|)``, the inverse of :func:`bernstein` (not differentiable: an oracle for the
    values; the fused op will carry the implicit-function gradient)."""
    theta = constrain(raw, bound)
    below, above = y <= -bound, y >= bound
    lo = torch.full_like(y, eps)
    hi = torch.full_like(y, 1 - eps)
    target = torch.where(below | above, torch.zeros_like(y), y)
    # bisection to the dtype's resolution: each step halves [lo, hi] (monotone f)
    for _ in range(int(-math.log2(torch.finfo(y.dtype).eps)) + 8):
        mid = 0.5 * (lo + hi)
        go_up = _poly(mid, theta) < target
        lo = torch.where(go_up, mid, lo)
        hi = torch.where(go_up, hi, mid)
    t = 0.5 * (lo + hi)
    _, slope = _poly_and_slope(t, theta)
    x_in = t * 2.0 * bound - bound
    x_below = ((y + bound) / (2.0 * bound) + eps) * 2.0 * bound - bound
    x_above = ((y - bound) / (2.0 * bound) - eps + 1) * 2.0 * bound - bound
    x = torch.where(below, x_below, torch.where(above, x_above, x_in))
    lad = torch.where(below | above, torch.zeros_like(y), -(torch.log(slope) - math.log(2.0 * bound)))
    return torch.where(torch.isnan(y), y, x), torch.where(torch.isnan(y), y, lad)
