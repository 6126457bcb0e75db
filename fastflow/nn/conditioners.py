"""Built-in conditioner networks: they map the identity part of a coupling (plus an optional
context vector) to the transform parameters. Their last layer starts at zero, so a fresh
coupling layer built on them is the identity map (Kingma & Dhariwal, 2018, sec. 3.3).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "ResidualMLP", "ConvNet", "ConvResNet", "call_conditioner"]


def _act(name_or_module):
    if isinstance(name_or_module, nn.Module):
        return name_or_module
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh, "silu": nn.SiLU,
             "leaky_relu": nn.LeakyReLU}
    if name_or_module not in table:
        raise ValueError(f"activation={name_or_module!r}: expected one of {sorted(table)} or an nn.Module")
    return table[name_or_module]()


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last layout on the CPU, where oneDNN's convolutions run faster on it.

    Faster forward and backward for ConvNet and ConvResNet at every image size we measured (and
    a faster Glow step on the digits: `benchmarks/train_digits.py`). The maths is the same
    (outputs agree to float32 rounding). GPUs keep the caller's layout.
    """
    if not x.is_cpu or torch._C._are_functorch_transforms_active():
        return x  # vmap cannot clone into channels-last; the layout is only a speed choice
    return x.contiguous(memory_format=torch.channels_last)


def call_conditioner(net: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Calls a built-in or user conditioner: ``net(x)`` without context, ``net(x, context)`` with."""
    return net(x) if context is None else net(x, context)


class MLP(nn.Module):
    """Fully connected conditioner ``(B, in) [+ (B, context)] -> (B, out)``.

    Args:
        in_features, out_features: input and output widths.
        hidden_features: width of the hidden layers.
        num_layers: number of hidden layers.
        context_features: width of the context vector concatenated to the input (None: none).
        activation: ``"relu"``, ``"gelu"``, ... or a module.
        zero_init: start the last layer at zero (the owning layer is then the identity).
    """

    def __init__(self, in_features, out_features, hidden_features=128, num_layers=2, context_features=None,
                 activation="relu", dropout=0.0, zero_init=True):
        super().__init__()
        self.hidden_features = hidden_features
        self.context_features = context_features
        width = in_features + (context_features or 0)
        layers = []
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_features), _act(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden_features
        last = nn.Linear(width, out_features)
        layers.append(_zero(last) if zero_init else last)
        self.net = nn.Sequential(*layers)

    def forward(self, x, context=None):
        if self.context_features:
            if context is None:
                raise ValueError(f"MLP was built with context_features={self.context_features} but got no context")
            x = torch.cat([x, context.to(x.dtype)], dim=-1)
        return self.net(x)


class _ResBlock(nn.Module):
    def __init__(self, features, context_features, activation, dropout):
        super().__init__()
        self.act = _act(activation)
        self.l1 = nn.Linear(features, features)
        self.l2 = nn.Linear(features, features)
        self.ctx = nn.Linear(context_features, features) if context_features else None
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        # Residual branches start small so a deep stack is close to its skip path (nflows does the same).
        nn.init.uniform_(self.l2.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.l2.bias, -1e-3, 1e-3)

    def forward(self, h, context=None):
        t = self.l1(self.act(h))
        if self.ctx is not None:
            t = t + self.ctx(context)
        t = self.l2(self.drop(self.act(t)))
        return h + t


class ResidualMLP(nn.Module):
    """Residual MLP conditioner (nflows' ``ResidualNet``): ``num_blocks`` pre-activation blocks."""

    def __init__(self, in_features, out_features, hidden_features=128, num_blocks=2, context_features=None,
                 activation="relu", dropout=0.0, zero_init=True):
        super().__init__()
        self.hidden_features = hidden_features
        self.context_features = context_features
        self.inp = nn.Linear(in_features + (context_features or 0), hidden_features)
        self.blocks = nn.ModuleList(
            [_ResBlock(hidden_features, context_features, activation, dropout) for _ in range(num_blocks)]
        )
        self.act = _act(activation)
        self.out = nn.Linear(hidden_features, out_features)
        if zero_init:
            _zero(self.out)

    def forward(self, x, context=None):
        if self.context_features:
            if context is None:
                raise ValueError(f"ResidualMLP was built with context_features={self.context_features} but got "
                                 "no context")
            context = context.to(x.dtype)
            x = torch.cat([x, context], dim=-1)
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, context)
        return self.out(self.act(h))


def _spatial_context(layer, context, like):
    # The context vector is projected to per-channel biases and broadcast over the image.
    return layer(context.to(like.dtype))[:, :, None, None]


class ConvNet(nn.Module):
    """Glow's coupling network ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` on ``(B, C, H, W)``.

    The context (if any) enters as a learned per-channel bias of the first hidden layer.
    """

    def __init__(self, in_channels, out_channels, hidden_channels=64, context_features=None, activation="relu",
                 zero_init=True):
        super().__init__()
        self.context_features = context_features
        self.hidden_features = hidden_channels
        self.c1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.c2 = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.c3 = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        self.ctx = nn.Linear(context_features, hidden_channels) if context_features else None
        self.act = _act(activation)
        if zero_init:
            _zero(self.c3)

    def forward(self, x, context=None):
        h = self.c1(_nhwc(x))
        if self.ctx is not None:
            if context is None:
                raise ValueError(f"ConvNet was built with context_features={self.context_features} but got no context")
            h = h + _spatial_context(self.ctx, context, h)
        h = self.c2(self.act(h))
        return self.c3(self.act(h)).contiguous()


class _ConvBlock(nn.Module):
    def __init__(self, ch, context_features, activation):
        super().__init__()
        self.n1 = nn.GroupNorm(min(8, ch), ch)
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.n2 = nn.GroupNorm(min(8, ch), ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.ctx = nn.Linear(context_features, ch) if context_features else None
        self.act = _act(activation)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, h, context=None):
        t = self.n2(self.c1(self.act(self.n1(h))))
        if self.ctx is not None:
            # after the norm: a per-channel bias before it would be normalised away
            t = t + _spatial_context(self.ctx, context, t)
        return h + self.c2(self.act(t))


class ConvResNet(nn.Module):
    """Convolutional ResNet conditioner (RealNVP, Dinh et al. 2017) on ``(B, C, H, W)``."""

    def __init__(self, in_channels, out_channels, hidden_channels=64, num_blocks=2, context_features=None,
                 activation="relu", zero_init=True):
        super().__init__()
        self.context_features = context_features
        self.hidden_features = hidden_channels
        self.inp = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.ModuleList([_ConvBlock(hidden_channels, context_features, activation)
                                     for _ in range(num_blocks)])
        self.act = _act(activation)
        self.out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        if zero_init:
            _zero(self.out)

    def forward(self, x, context=None):
        if self.context_features and context is None:
            raise ValueError(f"ConvResNet was built with context_features={self.context_features} but got no context")
        h = self.inp(_nhwc(x))
        for b in self.blocks:
            h = b(h, context)
        return self.out(self.act(h)).contiguous()
