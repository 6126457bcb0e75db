"""Glow's layers (Kingma & Dhariwal, 2018): ActNorm with data-dependent initialisation, the
invertible 1x1 convolution and linear map in LU form, their fused ActNorm+1x1 step, squeeze,
and the multi-scale architecture of RealNVP/Glow that factors out half the channels per level.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastflow.ops.lu import actnorm_conv1x1, lu_conv1x1, lu_linear, lu_weight
from fastflow.nn.base import Transform

__all__ = ["ActNorm", "InvConv1x1", "LULinear", "ActNormInvConv1x1", "Squeeze", "MultiScale"]


class _DataInit:
    """Mixin: data-dependent initialisation on the first training-mode forward pass.

    The flag is a persistent buffer, so a loaded checkpoint is not re-initialised; a Python
    mirror of it keeps the check out of the compiled graph.
    """

    def _init_flag(self):
        self.register_buffer("initialized", torch.tensor(False))
        self._is_init = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_init = bool(self.initialized)

    def _maybe_init(self, x):
        if self._is_init or not self.training or x.shape[0] < 2:
            return
        with torch.no_grad():
            self._data_init(x.detach())
            self.initialized.fill_(True)
        self._is_init = True


class ActNorm(_DataInit, Transform):
    """Per-channel (images ``(B, C, H, W)``) or per-feature (vectors ``(B, D)``) affine map
    ``y = (x + bias) * exp(log_scale)``, initialised from the first training batch so that
    ``y`` has zero mean and unit variance.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self._init_flag()

    def _data_init(self, x):
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))

    def _view(self, p, x):
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x, context=None):
        self._maybe_init(x)
        y = (x + self._view(self.bias, x)) * self._view(torch.exp(self.log_scale), x)
        n = math.prod(x.shape[2:])
        return y, (n * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, y, context=None):
        x = y * self._view(torch.exp(-self.log_scale), y) - self._view(self.bias, y)
        n = math.prod(y.shape[2:])
        return x, (-n * self.log_scale.sum()).expand(y.shape[0])


class _LU(nn.Module):
    """LU parameters ``W = P L (U + diag(sign * exp(log_s)))`` initialised from a random rotation."""

    def _init_lu(self, c, identity=False):
        w = torch.eye(c) if identity else torch.linalg.qr(torch.randn(c, c))[0]
        p, lo, up = torch.linalg.lu(w)
        s = torch.diagonal(up)
        self.register_buffer("perm", p.argmax(dim=1))
        self.register_buffer("sign", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lo, -1))
        self.upper = nn.Parameter(torch.triu(up, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _lu(self):
        return self.perm, self.lower, self.upper, self.log_s, self.sign.to(self.log_s.dtype)

    def weight(self) -> torch.Tensor:
        """The ``(C, C)`` matrix ``W``."""
        return lu_weight(*self._lu())


class InvConv1x1(_LU, Transform):
    """Invertible 1x1 convolution of ``(B, C, H, W)`` in LU form (fused op ``lu_conv1x1``)."""

    def __init__(self, channels: int, identity_init: bool = False, backend: str | None = None):
        super().__init__()
        self._init_lu(channels, identity_init)
        self.backend = backend  # forces the op's backend (None: the fastest available)

    def forward(self, x, context=None):
        return lu_conv1x1(x, *self._lu(), inverse=False, backend=self.backend)

    def inverse(self, y, context=None):
        return lu_conv1x1(y, *self._lu(), inverse=True, backend=self.backend)


class LULinear(_LU, Transform):
    """Invertible linear map ``y = W x`` of ``(B, D)`` in LU form (fused op ``lu_linear``)."""

    def __init__(self, features: int, identity_init: bool = False, backend: str | None = None):
        super().__init__()
        self._init_lu(features, identity_init)
        self.backend = backend  # forces the op's backend (None: the fastest available)

    def forward(self, x, context=None):
        return lu_linear(x, *self._lu(), inverse=False, backend=self.backend)

    def inverse(self, y, context=None):
        return lu_linear(y, *self._lu(), inverse=True, backend=self.backend)


class ActNormInvConv1x1(_DataInit, _LU, Transform):
    """ActNorm followed by the invertible 1x1 convolution as one fused op (``actnorm_conv1x1``),
    the first two thirds of a Glow step; same maths as ``ActNorm`` then ``InvConv1x1``."""

    def __init__(self, channels: int, identity_init: bool = False, backend: str | None = None):
        super().__init__()
        self.backend = backend  # forces the op's backend (None: the fastest available)
        self.an_bias = nn.Parameter(torch.zeros(channels))
        self.an_log_scale = nn.Parameter(torch.zeros(channels))
        self._init_lu(channels, identity_init)
        self._init_flag()

    def _data_init(self, x):
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3))
        self.an_bias.copy_(-mean)
        self.an_log_scale.copy_(-torch.log(std + 1e-6))

    def forward(self, x, context=None):
        self._maybe_init(x)
        return actnorm_conv1x1(x, self.an_bias, self.an_log_scale, *self._lu(), inverse=False,
                                    backend=self.backend)

    def inverse(self, y, context=None):
        return actnorm_conv1x1(y, self.an_bias, self.an_log_scale, *self._lu(), inverse=True,
                                    backend=self.backend)


class Squeeze(Transform):
    """Space-to-depth ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` (RealNVP's squeeze); volume preserving."""

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze: height and width must be even, got {tuple(x.shape)}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y, context=None):
        b, c, h, w = y.shape
        if c % 4:
            raise ValueError(f"Squeeze.inverse: channels must be a multiple of 4, got {tuple(y.shape)}")
        x = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
        return x, y.new_zeros(b)


class MultiScale(Transform):
    """Multi-scale architecture (Dinh et al., 2017): after each level but the last, half the
    channels are factored out straight to the output; the output is the flat concatenation
    ``(B, prod(in_shape))`` of all factored-out parts and the last level's output.

    Args:
        levels: one transform per level.
        shapes: each level's output shape ``(C, H, W)`` (its input is the previous level's
            output with the first ``C // 2`` channels kept).
    """

    def __init__(self, levels, shapes):
        super().__init__()
        if len(levels) != len(shapes):
            raise ValueError("MultiScale: one output shape per level")
        self.levels = nn.ModuleList(levels)
        self.shapes = [tuple(s) for s in shapes]
        self.keep = [s[0] // 2 for s in self.shapes[:-1]] + [self.shapes[-1][0]]
        self.sizes = []
        for s, k in zip(self.shapes, self.keep):
            out_c = s[0] - k if k != s[0] else s[0]
            self.sizes.append(out_c * s[1] * s[2])

    def forward(self, x, context=None):
        total = x.new_zeros(x.shape[0])
        outs = []
        for i, level in enumerate(self.levels):
            x, lad = level(x, context=context)
            total = total + lad
            if i < len(self.levels) - 1:
                k = self.keep[i]
                outs.append(x[:, k:].reshape(x.shape[0], -1))
                x = x[:, :k]
            else:
                outs.append(x.reshape(x.shape[0], -1))
        return torch.cat(outs, dim=1), total

    def inverse(self, z, context=None):
        parts = torch.split(z, self.sizes, dim=1)
        total = z.new_zeros(z.shape[0])
        b = z.shape[0]
        x = None
        for i in range(len(self.levels) - 1, -1, -1):
            c, h, w = self.shapes[i]
            if i == len(self.levels) - 1:
                y = parts[i].reshape(b, c, h, w)
            else:
                y = torch.cat([x, parts[i].reshape(b, c - self.keep[i], h, w)], dim=1)
            x, lad = self.levels[i].inverse(y, context=context)
            total = total + lad
        return x, total
