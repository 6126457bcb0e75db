"""Batch normalisation as a flow layer (Dinh et al., 2017; Papamakarios et al., 2017)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastflow.nn.base import Transform

__all__ = ["BatchNormFlow"]


class BatchNormFlow(Transform):
    """``y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta`` per feature (``(B, D)``) or
    channel (``(B, C, H, W)``).

    In training mode the batch statistics are used (and the running averages updated); in eval
    mode, and always in :meth:`inverse`, the running averages are. The log-determinant is that of
    the map actually applied (in training mode it treats the batch statistics as constants, as in
    the MAF paper).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _view(self, p, x):
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x, context=None):
        if self.training and x.shape[0] > 1:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        log_s = self.log_gamma - 0.5 * torch.log(var + self.eps)
        y = (x - self._view(mean, x)) * self._view(torch.exp(log_s), x) + self._view(self.beta, x)
        return y, (math.prod(x.shape[2:]) * log_s.sum()).expand(x.shape[0])

    def inverse(self, y, context=None):
        mean, var = self.running_mean.to(y.dtype), self.running_var.to(y.dtype)
        log_s = self.log_gamma - 0.5 * torch.log(var + self.eps)
        x = (y - self._view(self.beta, y)) * self._view(torch.exp(-log_s), y) + self._view(mean, y)
        return x, (-math.prod(y.shape[2:]) * log_s.sum()).expand(y.shape[0])
