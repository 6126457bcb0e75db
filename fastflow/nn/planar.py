"""Planar and radial flows (Rezende & Mohamed, 2015, "Variational Inference with Normalizing
Flows"), for variational inference by the reverse KL.

Both are given in the generative direction, noise ``z`` to sample ``x``; in fastflow's
convention (``forward`` maps data to noise) that map is the layer's ``inverse``, so
``Flow.sample_and_log_prob`` (what the reverse KL needs) uses only the closed-form maps:

- planar: ``x = z + u_hat h(w^T z + b)``, ``h = tanh``, ``log|det| = log|1 + u_hat^T w h'(w^T z + b)|``,
  with ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2``, ``m(a) = -1 + softplus(a) + 1e-6``, so that
  ``w^T u_hat > -1`` and the map is invertible (appendix A of the paper);
- radial: ``x = z + beta (z - z0) / (alpha + r)``, ``r = |z - z0|``, ``alpha = softplus(.) > 0``,
  ``beta = -alpha + softplus(.) > -alpha`` (invertibility).

Neither has a closed-form inverse in the paper's presentation, so ``log_prob`` of data is not
free. What fastflow does about it (``inverse="numerical"``, the default) is exact up to round-off:

- planar: ``w^T x = a + (w^T u_hat) tanh(a + b)`` is a strictly increasing scalar equation for
  ``a = w^T z``, whose root lies in ``[w^T x - |w^T u_hat|, w^T x + |w^T u_hat|]``; it is solved per
  sample by bisection to machine precision (about 60 halvings, never fails on finite input),
  then ``z = x - u_hat tanh(a + b)``. A final Newton step, taken with autograd on, gives the
  implicit-function gradient, so ``log_prob`` trains too.
- radial: ``|x - z0| = r (1 + beta / (alpha + r))`` is a quadratic in ``r`` with one
  non-negative root, evaluated in its cancellation-free form; then
  ``z = z0 + (x - z0) / (1 + beta / (alpha + r))``.

``inverse="refuse"`` makes ``forward`` (and so ``Flow.log_prob``) raise ``NotImplementedError``
instead, for users who want the paper's VI-only contract enforced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from fastflow.nn._loop import while_loop

from fastflow.nn.base import Transform

__all__ = ["PlanarFlow", "RadialFlow"]

_MARGIN = 1e-6


def _check_mode(inverse, who):
    if inverse not in ("numerical", "refuse"):
        raise ValueError(f"{who}: inverse={inverse!r}, expected 'numerical' or 'refuse'")


class _Generative(Transform):
    """Shared shape checks; subclasses implement ``_generate`` (noise to data) and ``_solve``."""

    # read by fastflow.compile: the numerical inverse iterates until converged (a data-dependent
    # loop), so log_prob runs it eagerly between compiled graphs; sampling is closed form
    graph_breaks = "log_prob: the numerical inverse (bisection until converged) runs eagerly"

    def __init__(self, features, inverse, who):
        super().__init__()
        if features < 1:
            raise ValueError(f"{who}: features must be >= 1, got {features}")
        _check_mode(inverse, who)
        self.features, self.inverse_mode, self._who = int(features), inverse, who

    def _check(self, x, what, context):
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{self._who}: {what} must have shape (B, {self.features}), got {tuple(x.shape)}")
        if context is not None:
            raise ValueError(f"{self._who} is unconditional; got a context of shape {tuple(context.shape)}")

    def inverse(self, z, context=None):
        """Noise to data, closed form: ``(x, log|det dx/dz|)``."""
        self._check(z, "z", context)
        return self._generate(z)

    def forward(self, x, context=None):
        """Data to noise by the numerical inverse: ``(z, log|det dz/dx|)``."""
        self._check(x, "x", context)
        if self.inverse_mode == "refuse":
            raise NotImplementedError(
                f"{self._who} has no closed-form inverse and was built with inverse='refuse': log_prob of data "
                "is not available; use sample_and_log_prob (reverse KL), or inverse='numerical'")
        if x.shape[0] == 0:
            return x.clone(), x.new_zeros(0)
        # torch.export traces the solve itself (a while_loop, no host sync); a non-finite row then
        # gives a non-finite result for that row instead of the eager path's error
        z = self._solve(x) if torch.compiler.is_exporting() else self._numerical_inverse(x)
        _, lad = self._generate(z)
        return z, -lad

    @torch.compiler.disable
    def _numerical_inverse(self, x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self._who}: x has non-finite values; the numerical inverse needs finite input")
        return self._solve(x)


class PlanarFlow(_Generative):
    """``x = z + u_hat tanh(w^T z + b)`` over ``(B, D)``.

    Args:
        features: ``D``.
        inverse: ``"numerical"`` (bisection, see the module docstring) or ``"refuse"``.
        init_scale: standard deviation of the initial ``u`` and ``w``.
    """

    def __init__(self, features, inverse="numerical", init_scale=0.1, max_iter=200):
        super().__init__(features, inverse, "PlanarFlow")
        w = init_scale * torch.randn(features) + 1.0 / features ** 0.5
        u = init_scale * torch.randn(features)
        # w^T u = log(e - 1) makes w^T u_hat = m(w^T u) = 0: a near-identity start (u_hat is the small
        # part of u orthogonal to w) instead of a contraction by up to 1 + m(0) = 0.69 per layer.
        u = u + (math.log(math.e - 1) - w @ u) * w / (w @ w)
        self.u = nn.Parameter(u)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(()))
        self.max_iter = max_iter

    def u_hat(self):
        wu = self.w @ self.u
        # m(a) = -1 + softplus(a) + margin: softplus underflows to 0 for a << 0 and w^T u_hat would
        # round to exactly -1 (a singular layer); the margin keeps it above -1 in float32 and float64.
        return self.u + (-1.0 + F.softplus(wu) + _MARGIN - wu) * self.w / (self.w @ self.w)

    def _generate(self, z):
        u = self.u_hat()
        a = z @ self.w + self.b
        h = torch.tanh(a)
        x = z + h[:, None] * u
        lad = torch.log1p((1 - h.pow(2)) * (self.w @ u))
        return x, lad

    def _solve(self, x):
        u = self.u_hat()
        s = self.w @ u  # > -1
        c = x @ self.w

        def residual(a):
            return a + s * torch.tanh(a + self.b) - c

        eps = 4 * torch.finfo(x.dtype).eps

        def unfinished(i, lo, hi, done):
            return (i < self.max_iter) & ~done

        def halve(i, lo, hi, done):
            mid = 0.5 * (lo + hi)
            pos = residual(mid) > 0
            lo, hi = torch.where(pos, lo, mid), torch.where(pos, mid, hi)
            return i + 1, lo, hi, ((hi - lo) <= eps * (1 + mid.abs())).all()

        with torch.no_grad():
            # one loop for eager and torch.export (fastflow/nn/_loop.py): the exported log_prob
            # halves until converged too
            start = (torch.zeros((), dtype=torch.int64, device=x.device), c - s.abs() - 1e-12, c + s.abs() + 1e-12,
                     torch.zeros((), dtype=torch.bool, device=x.device))
            _, lo, hi, _ = while_loop(unfinished, halve, start)
            a0 = 0.5 * (lo + hi)
        # One Newton step at the root: the same value, and autograd sees da = -dF / F'(a) (implicit gradient).
        a = a0 - residual(a0) / (1 + s * (1 - torch.tanh(a0 + self.b).pow(2)))
        return x - torch.tanh(a + self.b)[:, None] * u

    def extra_repr(self):
        return f"features={self.features}, inverse={self.inverse_mode!r}"


class RadialFlow(_Generative):
    """``x = z + beta (z - z0) / (alpha + |z - z0|)`` over ``(B, D)``.

    Args:
        features: ``D``.
        inverse: ``"numerical"`` (the closed-form root of a quadratic, see the module docstring) or
            ``"refuse"``.
    """

    def __init__(self, features, inverse="numerical", init_scale=0.1):
        super().__init__(features, inverse, "RadialFlow")
        self.z0 = nn.Parameter(init_scale * torch.randn(features))
        self.alpha_raw = nn.Parameter(torch.zeros(()))
        self.beta_raw = nn.Parameter(torch.zeros(()))

    def alpha_beta(self):
        alpha = F.softplus(self.alpha_raw)
        return alpha, -alpha + F.softplus(self.beta_raw)

    def _generate(self, z):
        alpha, beta = self.alpha_beta()
        diff = z - self.z0
        r = diff.norm(dim=1)
        h = 1.0 / (alpha + r)
        x = z + (beta * h)[:, None] * diff
        d = self.features
        # det = (1 + beta h)^(D-1) (1 + beta h + beta h' r), h' = -h^2
        lad = (d - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h.pow(2) * r)
        return x, lad

    def _solve(self, x):
        alpha, beta = self.alpha_beta()
        diff = x - self.z0
        rp = diff.norm(dim=1)
        b = alpha + beta - rp
        sq = torch.sqrt(b.pow(2) + 4 * alpha * rp)
        pos = b > 0
        r = torch.where(pos, 2 * alpha * rp / torch.where(pos, b + sq, 1.0), 0.5 * (sq - b))
        return self.z0 + diff / (1 + beta / (alpha + r))[:, None]

    def extra_repr(self):
        return f"features={self.features}, inverse={self.inverse_mode!r}"
