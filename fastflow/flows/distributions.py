"""Base distributions of flows. Every sample is reparameterised (differentiable in the
distribution's parameters); ``log_prob`` returns one value per sample, shape ``(batch,)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Distribution", "StandardNormal", "DiagonalNormal", "StandardLogistic", "ConditionalDiagonalNormal",
           "BoxUniform"]


def _shape(shape):
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class Distribution(nn.Module):
    """A distribution over events of ``shape``: ``log_prob(z, context=None) -> (B,)``,
    ``sample(n, context=None) -> (n, *shape)``, ``sample_and_log_prob(n, context=None)``."""

    def __init__(self, shape):
        super().__init__()
        self.shape = _shape(shape)
        # Tracks the module's device and dtype so that samples follow ``.to(...)``.
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def _check(self, z):
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__}: expected samples of shape (B, {self.shape}), "
                             f"got {tuple(z.shape)}")

    def log_prob(self, z, context=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_and_log_prob(self, n: int, context=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int, context=None):
        return self.sample_and_log_prob(n, context)[0]

    def forward(self, z, context=None):
        return self.log_prob(z, context)


class StandardNormal(Distribution):
    """``N(0, I)`` over ``shape``."""

    def log_prob(self, z, context=None):
        self._check(z)
        d = math.prod(self.shape)
        return -0.5 * z.reshape(z.shape[0], -1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def sample_and_log_prob(self, n, context=None):
        z = torch.randn(n, *self.shape, device=self._ref.device, dtype=self._ref.dtype)
        return z, self.log_prob(z)


class DiagonalNormal(Distribution):
    """``N(loc, diag(exp(log_scale))^2)`` with learnable ``loc`` and ``log_scale`` of ``shape``."""

    def __init__(self, shape):
        super().__init__(shape)
        self.loc = nn.Parameter(torch.zeros(self.shape))
        self.log_scale = nn.Parameter(torch.zeros(self.shape))

    def _params(self, context, n):
        return self.loc.expand(n, *self.shape), self.log_scale.expand(n, *self.shape)

    def log_prob(self, z, context=None):
        self._check(z)
        loc, log_scale = self._params(context, z.shape[0])
        e = (z - loc) * torch.exp(-log_scale)
        d = math.prod(self.shape)
        per = -0.5 * e.pow(2) - log_scale
        return per.reshape(z.shape[0], -1).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def sample_and_log_prob(self, n, context=None):
        loc, log_scale = self._params(context, n)
        eps = torch.randn(n, *self.shape, device=loc.device, dtype=loc.dtype)
        z = loc + torch.exp(log_scale) * eps
        return z, self.log_prob(z, context)


class ConditionalDiagonalNormal(DiagonalNormal):
    """Diagonal normal whose ``loc`` and ``log_scale`` are a linear function of the context
    (initialised to ``N(0, I)``), for conditional flows."""

    def __init__(self, shape, context_features: int):
        super().__init__(shape)
        d = math.prod(self.shape)
        self.net = nn.Linear(context_features, 2 * d)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def _params(self, context, n):
        if context is None:
            raise ValueError("ConditionalDiagonalNormal needs a context")
        h = self.net(context.to(self.loc.dtype))
        d = math.prod(self.shape)
        loc = self.loc + h[:, :d].reshape(-1, *self.shape)
        log_scale = self.log_scale + h[:, d:].reshape(-1, *self.shape)
        return loc.expand(n, *self.shape), log_scale.expand(n, *self.shape)


class StandardLogistic(Distribution):
    """Independent standard logistic over ``shape`` (NICE's prior): ``log p = -sum softplus(z) + softplus(-z)``."""

    def log_prob(self, z, context=None):
        self._check(z)
        return -(F.softplus(z) + F.softplus(-z)).reshape(z.shape[0], -1).sum(1)

    def sample_and_log_prob(self, n, context=None):
        tiny = torch.finfo(self._ref.dtype).tiny
        u = torch.rand(n, *self.shape, device=self._ref.device, dtype=self._ref.dtype).clamp(tiny, 1 - 1e-7)
        z = torch.log(u) - torch.log1p(-u)
        return z, self.log_prob(z)


class BoxUniform(Distribution):
    """Uniform on the box ``[low, high]^shape`` (the base of circular flows: zuko's NCSF takes
    ``[-pi - 1e-5, pi + 1e-5]``): ``log p = -D log(high - low)`` inside, ``-inf`` outside."""

    def __init__(self, shape, low: float, high: float):
        super().__init__(shape)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"BoxUniform: expected finite low < high, got low={low}, high={high}")
        self.low, self.high = low, high

    def log_prob(self, z, context=None):
        self._check(z)
        flat = z.reshape(z.shape[0], -1)
        inside = ((flat >= self.low) & (flat <= self.high)).all(1)
        d = math.prod(self.shape)
        value = torch.full_like(flat[:, 0], -d * math.log(self.high - self.low))
        # NaN stays NaN (a NaN sample is neither inside nor outside)
        return torch.where(inside, value, torch.where(flat.isnan().any(1), flat.sum(1), -math.inf))

    def sample_and_log_prob(self, n, context=None):
        u = torch.rand(n, *self.shape, device=self._ref.device, dtype=self._ref.dtype)
        z = self.low + (self.high - self.low) * u
        return z, self.log_prob(z)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, low={self.low}, high={self.high}"
