"""Autoregressive layers: MADE (Germain et al., 2015), the masked affine autoregressive flow
(MAF, Papamakarios et al., 2017; IAF, Kingma et al., 2016, is its inverse) and the masked
rational-quadratic autoregressive flow (NSF-AR, Durkan et al., 2019).

The density direction (data -> noise) is one pass of the MADE; the inverse needs ``D`` passes,
one per feature, because feature ``d`` depends on the already inverted features ``< d``.
:class:`MaskedAutoregressive` takes any elementwise :mod:`law <fastflow.nn.laws>`;
:class:`MaskedAffineAutoregressive` and :class:`MaskedRQAutoregressive` are it with the affine
and spline laws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn.base import InverseTransform, Transform
from fastflow.nn.conditioners import _act
from fastflow.nn.laws import AffineLaw, SplineLaw, make_law

__all__ = ["MaskedLinear", "MADE", "MaskedAutoregressive", "MaskedAffineAutoregressive", "InverseAutoregressive",
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
        return self.fixed(context)(x)

    def fixed(self, context=None):
        """``x -> self(x, context)`` with what does not depend on ``x`` computed once: the masked
        weights and the context's term. ``forward`` is one call of it; the ``D`` passes of an
        inverse (sampling) call the MADE with the same weights and context ``D`` times."""
        hidden = [(layer.weight * layer.mask, layer.bias) for layer in self.hidden]
        out_w, out_b = self.out.weight * self.out.mask, self.out.bias
        ctx = None
        if self.ctx is not None:
            if context is None:
                raise ValueError(f"MADE was built with context_features={self.context_features} but got no context")
            ctx = self.ctx(context.to(out_w.dtype))
        shape = (self.features, self.params_per_feature)

        def run(x):
            h = F.linear(x, *hidden[0])
            if ctx is not None:
                h = h + ctx
            for w, b in hidden[1:]:
                h = F.linear(self.act(h), w, b)
            return F.linear(self.act(h), out_w, out_b).reshape(x.shape[0], *shape)

        return run


class MaskedAutoregressive(Transform):
    """An autoregressive layer: ``y_d = f(x_d; theta_d(x_<d))`` for any elementwise law ``f``,
    the parameters from a :class:`MADE` (fast density, ``D``-pass inverse).

    Args:
        features: ``D``.
        law: a :class:`~fastflow.nn.laws.Law` or a law name (``"affine"``, ``"additive"``,
            ``"spline"``).
        hidden_features, num_layers, context_features, order, activation: the MADE's.
    """

    def __init__(self, features, law, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu"):
        super().__init__()
        self.features = features
        self.law = make_law(law)
        self.law.bind(hidden_features)
        self.made = MADE(features, self.law.params_per_element, hidden_features, num_layers, context_features, order,
                         activation, zero_init=getattr(self.law, "zero_init", True))

    @property
    def params_per_feature(self) -> int:
        return self.law.params_per_element

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
        made = self.made.fixed(context)  # the masked weights and the context's term, once for D passes
        # After pass k the first k features (in autoregressive order) are exact.
        for _ in range(self.features):
            x, lad = self._elementwise(y, made(x), inverse=True)
        return x, lad

    def _elementwise(self, x, params, inverse):
        return self.law(x, params, inverse)


class MaskedAffineAutoregressive(MaskedAutoregressive):
    """MAF layer: ``y_d = x_d * s_d(x_<d) + t_d(x_<d)`` (fast density, ``D``-pass inverse):
    :class:`MaskedAutoregressive` with :class:`~fastflow.nn.laws.AffineLaw`.

    Args:
        features: ``D``.
        scale: ``"softclamp"`` (default), ``"exp"`` or ``"sigmoid"``, as in :class:`AffineCoupling`.
        backend: forces an op backend (None: the fastest available).
    """

    def __init__(self, features, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu", scale="softclamp", clamp=2.0, backend=None):
        super().__init__(features, AffineLaw(scale, clamp, backend), hidden_features, num_layers, context_features,
                         order, activation)

    @property
    def scale(self) -> str:
        return self.law.scale

    @property
    def clamp(self) -> float:
        return self.law.clamp


def InverseAutoregressive(features, **kwargs) -> Transform:  # noqa: N802 - a layer constructor
    """IAF layer: the inverse of a MAF layer (fast sampling, ``D``-pass density)."""
    return InverseTransform(MaskedAffineAutoregressive(features, **kwargs))


class MaskedRQAutoregressive(MaskedAutoregressive):
    """NSF-AR layer: an elementwise RQ spline whose parameters for ``x_d`` come from ``x_<d``:
    :class:`MaskedAutoregressive` with :class:`~fastflow.nn.laws.SplineLaw`."""

    def __init__(self, features, hidden_features=128, num_layers=2, context_features=None, order=None,
                 activation="relu", num_bins=8, tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3,
                 min_derivative=1e-3, backend=None):
        law = SplineLaw(num_bins, tail_bound, min_bin_width, min_bin_height, min_derivative, backend)
        super().__init__(features, law, hidden_features, num_layers, context_features, order, activation)

    @property
    def num_bins(self) -> int:
        return self.law.num_bins

    @property
    def spline_kwargs(self) -> dict:
        return self.law.spline_kwargs
