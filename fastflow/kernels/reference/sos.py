"""The ``reference`` backend's sum-of-squares polynomial law: the readable pure-torch oracle of
the op ``fastflow::sos_polynomial`` (``fastflow/ops/polynomial.py``).

Element for element zuko 1.6's ``SOSPolynomialTransform(a, slope)`` (the law of zuko's
``SOSPF`` and sbi's ``zuko_sospf``; Jaini, Selby & Yu, "Sum-of-Squares Polynomial Flow", 2019):

    f(x) = int_0^x g(u) du,   g(u) = slope + (1/K) sum_k p_k(u / B)^2,
    p_k(s) = 1 + sum_(j <= L) a_(k,j) s^j

with ``a (..., K, L + 1)`` and zuko's bound ``B = 10``. zuko integrates by an ``(L + 1)``-point
Gauss-Legendre rule, exact for the degree-``2L`` integrand; here the integral is the closed form
``f(x) = slope x + (B / K) sum_k sum_(i,j) a'_(k,i) a'_(k,j) s^(i+j+1) / (i + j + 1)`` with
``s = x / B`` and ``a'`` the coefficients with the 1 added to ``a_(k,0)`` (equal to zuko's to
rounding). ``log|f'| = log g(x)``. ``f`` increases on the whole line (``g >= slope > 0``), so
the inverse is solved on the whole line (zuko bisects on ``[-B, B]`` only, to about 1e-6, and
returns ``+-B`` beyond ``f(+-B)``).
"""

from __future__ import annotations

import math

import torch

from fastflow.kernels.reference._precision import upcast

__all__ = ["sos", "sos_inverse", "sos_inverse_differentiable", "evaluate", "vjp", "forward", "backward", "BOUND",
           "SLOPE"]

BOUND = 10.0  # zuko's MonotonicTransform default
SLOPE = 1e-3


def _shifted(a: torch.Tensor) -> torch.Tensor:
    """``a'``: the coefficients with the constant 1 of ``p_k`` added to ``a_(k,0)``."""
    return torch.cat([a[..., :1] + 1.0, a[..., 1:]], -1)


def _g(x, a, bound, slope):
    """``g(x)`` (``x (...)``, ``a (..., K, L + 1)``)."""
    s = (x / bound)[..., None, None]
    p = (_shifted(a) * s ** torch.arange(a.shape[-1], dtype=x.dtype, device=x.device)).sum(-1)
    return p.square().mean(-1) + slope


def sos(x: torch.Tensor, a: torch.Tensor, bound: float = BOUND, slope: float = SLOPE):
    """``(y, log|dy/dx|)`` elementwise; differentiable by autograd. A NaN input gives NaN."""
    ap = _shifted(a)
    n = a.shape[-1]
    ij = (torch.arange(n, device=x.device)[:, None] + torch.arange(n, device=x.device)[None, :] + 1).to(x.dtype)
    s = (x / bound)[..., None, None, None]
    terms = ap[..., :, None] * ap[..., None, :] * s**ij / ij  # (..., K, L + 1, L + 1)
    y = slope * x + bound * terms.sum((-1, -2)).mean(-1)
    return y, torch.log(_g(x, a, bound, slope))


def _root(y, a, bound, slope):
    """``x`` with ``f(x) = y``: a bracket grown from ``[-B, B]`` by doubling, then bisection to
    the dtype's resolution (values only)."""
    lo = torch.full_like(y, -bound)
    hi = torch.full_like(y, bound)
    for _ in range(64):  # |f(x)| >= slope |x|: the bracket holds y after at most ~log2(|y| / (slope B))
        f_lo, _ = sos(lo, a, bound, slope)
        f_hi, _ = sos(hi, a, bound, slope)
        lo = torch.where(f_lo > y, 2.0 * lo, lo)
        hi = torch.where(f_hi < y, 2.0 * hi, hi)
    for _ in range(int(-math.log2(torch.finfo(y.dtype).eps)) + 70):
        mid = 0.5 * (lo + hi)
        go_up = sos(mid, a, bound, slope)[0] < y
        lo = torch.where(go_up, mid, lo)
        hi = torch.where(go_up, hi, mid)
    return 0.5 * (lo + hi)


def sos_inverse(y: torch.Tensor, a: torch.Tensor, bound: float = BOUND, slope: float = SLOPE):
    """``(x, log|dx/dy|)``, the inverse of :func:`sos` (values only)."""
    x = _root(torch.where(torch.isnan(y), torch.zeros_like(y), y), a, bound, slope)
    lad = -torch.log(_g(x, a, bound, slope))
    return torch.where(torch.isnan(y), y, x), torch.where(torch.isnan(y), y, lad)


def sos_inverse_differentiable(y, a, bound: float = BOUND, slope: float = SLOPE):
    """:func:`sos_inverse` in differentiable ops (the op's composite): the root without gradient,
    then two Newton steps from it for the implicit function's first and second derivatives; the
    value stays the root's."""
    safe = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    with torch.no_grad():
        x0 = _root(safe.detach(), a.detach(), bound, slope)
    x = x0
    for _ in range(2):
        f, _ = sos(x, a, bound, slope)
        x = x - (f - safe) / _g(x, a, bound, slope)
    x = x0 + (x - x.detach())
    lad = -torch.log(_g(x, a, bound, slope))
    return torch.where(torch.isnan(y), y, x), torch.where(torch.isnan(y), y, lad)


def evaluate(x, a, inverse: bool, bound: float, slope: float):
    """The law in differentiable torch ops: the forward or the inverse."""
    return (sos_inverse_differentiable if inverse else sos)(x, a, bound, slope)


def vjp(g_out, g_lad, z, a, inverse: bool, bound: float, slope: float):
    """Analytic vector-Jacobian product of :func:`evaluate` (gradients for ``z`` and ``a``): with
    ``s = x / B``, ``dy/da_(k,j) = (2B/K) sum_i a'_(k,i) s^(i+j+1) / (i+j+1)``, ``d log g /
    da_(k,j) = 2 p_k s^j / (K g)``, ``g' = 2 mean_k p_k p_k' / B``; the inverse's from the
    implicit function (``dx/dy = 1/g``, ``dx/da = -(dy/da)/g``)."""
    nan = torch.isnan(z)
    x = _root(torch.where(nan, torch.zeros_like(z), z), a, bound, slope) if inverse else z
    x = torch.where(nan, z, x)
    k, n = a.shape[-2], a.shape[-1]
    ap = _shifted(a)
    s = (x / bound)[..., None, None]
    i = torch.arange(n, dtype=x.dtype, device=x.device)
    p = (ap * s**i).sum(-1)  # (..., K)
    dp = (ap[..., 1:] * i[1:] * s ** i[:-1]).sum(-1)
    g = slope + p.square().mean(-1)
    dg = 2.0 * (p * dp).mean(-1) / bound
    ij = i[:, None] + i[None, :] + 1
    dy = 2.0 * bound / k * (ap[..., :, :, None] * s[..., None] ** ij / ij).sum(-2)  # (..., K, L + 1)
    dlad = 2.0 * p[..., None] * s**i / (k * g[..., None, None])
    go, gl = g_out[..., None, None], g_lad[..., None, None]
    if inverse:
        dx = -dy / g[..., None, None]
        g_z = g_out / g - g_lad * dg / (g * g)
        g_a = go * dx - gl * (dlad + (dg / g)[..., None, None] * dx)
    else:
        g_z = g_out * g + g_lad * dg / g
        g_a = go * dy + gl * dlad
    return g_z, g_a


# The launcher interface of kernels/<backend>/sos.py: ``x (...)``, ``a (..., K, L + 1)``; the
# outputs, or the gradients ``(x, a)``, in the inputs' dtype.

def forward(x, a, inverse, bound, slope):
    xx, aa = upcast(x, a)
    out, lad = (sos_inverse if inverse else sos)(xx, aa, bound, slope)
    return out.to(x.dtype).contiguous(), lad.to(x.dtype).contiguous()


def backward(g_out, g_lad, x, a, inverse, bound, slope):
    grads = vjp(*upcast(g_out, g_lad, x, a), inverse, bound, slope)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, a)))
