"""Autoregressive layers: MADE (Germain et al., 2015), the masked affine autoregressive flow
(MAF, Papamakarios et al., 2017; IAF, Kingma et al., 2016, is its inverse) and the masked
rational-quadratic autoregressive flow (NSF-AR, Durkan et al., 2019).

The density direction (data -> noise) is one pass of the MADE; the inverse needs ``D`` passes,
one per feature, because feature ``d`` depends on the already inverted features ``< d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn import _ops
from fastflow.nn.base import InverseTransform, Transform
from fastflow.nn.conditioners import _act

__all__ = ["MaskedLinear", "MADE", "MaskedAffineAutoregressive", "InverseAutoregressive",
           "MaskedRQAutoregressive"]


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask (out, in)``."""

    def __init__(self, in_features, out_features, mask: torch.Tensor, bias=True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder: output ``(B, D, P)`` whose ``[:, d]`` depends only on ``x[:, order < order[d]]``.

    Args:
        features: ``D``.
        params_per_feature: ``P`` outputs per feature.
        hidden_features, num_layers: width and number of hidden layers.
        context_features: the context enters the first hidden layer unmasked.
        order: a permutation giving each input's position in the autoregressive order
            (default ``0..D-1``).
        zero_init: last layer starts at zero (the owning layer starts as the identity).
    """

    def __init__(self, features, params_per_feature, hidden_features=128, num_layers=2, context_features=None,
                 order=None, activation="relu", zero_init=True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MADE: num_layers must be >= 1, got {num_layers}")
        self.features, self.params_per_feature = features, params_per_feature
        self.hidden_features = hidden_features
        self.context_features = context_features
        deg_in = (torch.arange(features) if order is None else torch.as_tensor(order).long()) + 1
        if sorted(deg_in.tolist()) != list(range(1, features + 1)):
            raise ValueError(f"MADE: order must be a permutation of 0..{features - 1}")
        self.register_buffer("degrees", deg_in, persistent=False)
        deg_h = torch.arange(hidden_features) % max(1, features - 1) + min(1, features - 1)
        layers = []
        prev = deg_in
        for i in range(num_layers):
            mask = (deg_h[:, None] >= prev[None, :])
            layers.append(MaskedLinear(features if i == 0 else hidden_features, hidden_features, mask))
            prev = deg_h
        self.hidden = nn.ModuleList(layers)
        deg_out = deg_in.repeat_interleave(params_per_feature)
        self.out = MaskedLinear(hidden_features, features * params_per_feature, deg_out[:, None] > prev[None, :])
        self.ctx = nn.Linear(context_features, hidden_features) if context_features else None
        self.act = _act(activation)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x, context=None):
        h = self.hidden[0](x)
        if self.ctx is not None:
            if context is None:
                raise ValueError(f"MADE was built with context_features={self.context_features} but got no context")
            h = h + self.ctx(context.to(x.dtype))
        for layer in self.hidden[1:]:
            h = layer(self.act(h))
        return self.out(self.act(h)).reshape(x.shape[0], self.features, self.params_per_feature)


class _Autoregressive(Transform):
    params_per_feature = 1

    def __init__(self, features, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu"):
        super().__init__()
        self.features = features
        self.made = MADE(features, self.params_per_feature, hidden_features, num_layers, context_features, order,
                         activation)

    def _check(self, x):
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{type(self).__name__}: expected (B, {self.features}), got {tuple(x.shape)}")

    def forward(self, x, context=None):
        self._check(x)
        return self._elementwise(x, self.made(x, context), inverse=False)

    def inverse(self, y, context=None):
        self._check(y)
        x = torch.zeros_like(y)
        lad = y.new_zeros(y.shape[0])
        # After pass k the first k features (in autoregressive order) are exact.
        for _ in range(self.features):
            x, lad = self._elementwise(y, self.made(x, context), inverse=True)
        return x, lad

    def _elementwise(self, x, params, inverse):  # pragma: no cover - abstract
        raise NotImplementedError


class MaskedAffineAutoregressive(_Autoregressive):
    """MAF layer: ``y_d = x_d * s_d(x_<d) + t_d(x_<d)`` (fast density, ``D``-pass inverse).

    Args:
        features: ``D``.
        scale: ``"softclamp"`` (default), ``"exp"`` or ``"sigmoid"``, as in :class:`AffineCoupling`.
    """

    params_per_feature = 2

    def __init__(self, features, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu", scale="softclamp", clamp=2.0):
        super().__init__(features, hidden_features, num_layers, context_features, order, activation)
        self.scale, self.clamp = scale, float(clamp)

    def _elementwise(self, x, params, inverse):
        return _ops.affine(x, params[..., 0], params[..., 1], scale=self.scale, clamp=self.clamp, inverse=inverse)


def InverseAutoregressive(features, **kwargs) -> Transform:  # noqa: N802 - a layer constructor
    """IAF layer: the inverse of a MAF layer (fast sampling, ``D``-pass density)."""
    return InverseTransform(MaskedAffineAutoregressive(features, **kwargs))


class MaskedRQAutoregressive(_Autoregressive):
    """NSF-AR layer: an elementwise RQ spline whose parameters for ``x_d`` come from ``x_<d``."""

    def __init__(self, features, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu", num_bins=8, tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3,
                 min_derivative=1e-3, backend=None):
        self.num_bins = int(num_bins)
        self.params_per_feature = 3 * self.num_bins - 1
        super().__init__(features, hidden_features, num_layers, context_features, order, activation)
        self.spline_kwargs = dict(tail_bound=float(tail_bound), min_bin_width=min_bin_width,
                                  min_bin_height=min_bin_height, min_derivative=min_derivative, backend=backend)
        self._wh_scale = 1.0 / math.sqrt(hidden_features)
        self._d_offset = math.log(math.expm1(1.0 - min_derivative))

    def _elementwise(self, x, params, inverse):
        k = self.num_bins
        uw = params[..., :k] * self._wh_scale
        uh = params[..., k : 2 * k] * self._wh_scale
        ud = params[..., 2 * k :] + self._d_offset
        y, lad = _ops.rq_spline(x, uw, uh, ud, inverse=inverse, **self.spline_kwargs)
        return y, lad.sum(dim=1)
