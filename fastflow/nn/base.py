"""The layer contract and the containers every flow is built from.

A :class:`Transform` maps data towards noise. ``forward(x, context=None)`` returns
``(y, logabsdet)`` with ``logabsdet = log|det dy/dx|`` of shape ``(batch,)``, and
``inverse(y, context=None)`` returns ``(x, log|det dx/dy|)``; the convention is nflows'.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["Transform", "CompositeTransform", "InverseTransform", "Reshape"]


class Transform(nn.Module):
    """An invertible map with a tractable log-determinant.

    Subclasses implement ``forward(x, context=None) -> (y, logabsdet)`` and
    ``inverse(y, context=None) -> (x, logabsdet)``, both logabsdets of shape ``(batch,)``.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no inverse")


class CompositeTransform(Transform):
    """Applies ``transforms`` in order; the inverse applies their inverses in reverse order."""

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x, context=None):
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, lad = t(x, context=context)
            total = total + lad
        return x, total

    def inverse(self, y, context=None):
        total = y.new_zeros(y.shape[0])
        for t in reversed(self.transforms):
            y, lad = t.inverse(y, context=context)
            total = total + lad
        return y, total

    def __len__(self):
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]


class InverseTransform(Transform):
    """Swaps ``forward`` and ``inverse`` of ``transform`` (IAF is the inverse of MAF)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x, context=None):
        return self.transform.inverse(x, context=context)

    def inverse(self, y, context=None):
        return self.transform(y, context=context)


class Reshape(Transform):
    """Volume-preserving reshape of the event, e.g. an image ``(C, H, W)`` to a vector ``(C*H*W,)``."""

    def __init__(self, in_shape, out_shape):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"Reshape: in_shape {self.in_shape} and out_shape {self.out_shape} differ in size")

    def forward(self, x, context=None):
        return x.reshape(x.shape[0], *self.out_shape), x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        return y.reshape(y.shape[0], *self.in_shape), y.new_zeros(y.shape[0])

    def extra_repr(self):
        return f"{self.in_shape} -> {self.out_shape}"


class Softclip(Transform):
    """``y = x / (1 + |x| / B)``: the real line onto ``(-B, B)``, elementwise (zuko's
    ``SoftclipTransform``, which its SOSPF puts between layers to keep stacked polynomials in
    range); log-det ``-2 log(1 + |x| / B)`` summed per sample, inverse ``x = y / (1 - |y| / B)``
    (defined for ``|y| < B``)."""

    def __init__(self, bound: float = 1.0):
        super().__init__()
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0 < float(bound) < math.inf:
            raise ValueError(f"Softclip: bound must be a finite positive number, got {bound!r}")
        self.bound = float(bound)

    def forward(self, x, context=None):
        d = 1 + x.abs() / self.bound
        return x / d, -2 * torch.log(d).flatten(1).sum(1)

    def inverse(self, y, context=None):
        d = 1 - y.abs() / self.bound
        return y / d, -2 * torch.log(d).flatten(1).sum(1)

    def extra_repr(self):
        return f"bound={self.bound}"


class CircularWrap(Transform):
    """Angles onto ``[-pi, pi)``: ``(x + pi) mod 2 pi - pi``, both ways, log-det 0 (on the
    circle it is the identity). First in a circular flow, so that the density of an angle does not
    depend on the turn it is given in (``[0, 2 pi)`` or ``[-pi, pi)`` data alike)."""

    @staticmethod
    def _wrap(x):
        return torch.remainder(x + math.pi, 2 * math.pi) - math.pi

    def forward(self, x, context=None):
        return self._wrap(x), x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        return self._wrap(y), y.new_zeros(y.shape[0])
