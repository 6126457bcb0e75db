"""Full-covariance affine flow in Cholesky form."""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.base import Transform

__all__ = ["CholeskyAffine"]


class CholeskyAffine(Transform):
    """``z = L^{-1} (x - loc)`` on ``(B, D)`` with ``L`` lower triangular, positive diagonal
    ``exp(log_diag)``: with a standard normal base this is exactly ``N(loc, L L^T)``, a
    full-covariance Gaussian, and as a layer a general (triangular-factored) affine map.

    ``logabsdet = -sum(log_diag)``; the inverse is ``x = L z + loc``.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.loc = nn.Parameter(torch.zeros(features))
        self.log_diag = nn.Parameter(torch.zeros(features))
        self.off_diag = nn.Parameter(torch.zeros(features, features))

    def scale_tril(self) -> torch.Tensor:
        """``L (D, D)``; ``L L^T`` is the covariance of the flow's data under a ``N(0, I)`` base."""
        return torch.tril(self.off_diag, -1) + torch.diag(torch.exp(self.log_diag))

    def _check(self, x):
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"CholeskyAffine: expected (B, {self.features}), got {tuple(x.shape)}")

    def forward(self, x, context=None):
        self._check(x)
        rhs = (x - self.loc).T
        z = torch.linalg.solve_triangular(self.scale_tril(), rhs, upper=False).T
        return z, (-self.log_diag.sum()).expand(x.shape[0])

    def inverse(self, z, context=None):
        self._check(z)
        return z @ self.scale_tril().T + self.loc, self.log_diag.sum().expand(z.shape[0])
