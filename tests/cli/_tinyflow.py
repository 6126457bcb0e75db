"""A tiny flow for the CLI tests that need no model zoo: x = mu + exp(s) * (L z), with L unit
lower-triangular (a full-covariance Gaussian), plus the builder signature of fastflow.flows.build."""

from __future__ import annotations

import math

import torch


class TinyFlow(torch.nn.Module):
    def __init__(self, shape, hidden: int = 0):
        super().__init__()
        self.shape = tuple(shape)
        d = math.prod(self.shape)
        self.d = d
        self.mu = torch.nn.Parameter(0.1 * torch.randn(d))
        self.log_scale = torch.nn.Parameter(torch.zeros(d))
        self.lower = torch.nn.Parameter(0.01 * torch.randn(d, d))
        self.spec = {"name": "tiny", "shape": list(self.shape), "hidden": hidden}

    def _l(self):
        return torch.tril(self.lower, -1) + torch.eye(self.d)

    def log_prob(self, x, context=None):
        x = x.reshape(len(x), -1)
        y = (x - self.mu) * torch.exp(-self.log_scale)
        z = torch.linalg.solve_triangular(self._l(), y.T, upper=False, unitriangular=True).T
        return -0.5 * (z ** 2).sum(1) - 0.5 * self.d * math.log(2 * math.pi) - self.log_scale.sum()

    def sample(self, n, context=None):
        z = torch.randn(n, self.d)
        return (self.mu + torch.exp(self.log_scale) * (z @ self._l().T)).reshape(n, *self.shape)


def build(name="tiny", shape=(2,), context_features=None, **kwargs):
    if name != "tiny":
        raise ValueError(f"unknown model {name!r}")
    return TinyFlow(shape, **kwargs)
