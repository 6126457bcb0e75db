"""Coupling layers: RealNVP's affine coupling (Dinh et al., 2017), NICE's additive coupling and
scaling (Dinh et al., 2015) and the rational-quadratic spline coupling of Neural Spline Flows
(Durkan et al., 2019), on vectors ``(B, D)`` or images ``(B, C, H, W)``.

The part of the input where ``mask`` is False passes through unchanged and, with the optional
context, is the conditioner's input; the conditioner's output parameterises an elementwise
bijection (a :mod:`law <fastflow.nn.laws>`) of the part where ``mask`` is True, which runs in a
fused op of :mod:`fastflow.ops`. ``Coupling(mask, law, conditioner)`` takes any law;
:class:`AffineCoupling`, :class:`AdditiveCoupling` and :class:`RQSplineCoupling` are it with the
affine, additive and spline laws.
"""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.base import Transform
from fastflow.nn.conditioners import MLP, ConvNet, ConvResNet, ResidualMLP, call_conditioner
from fastflow.nn.laws import AdditiveLaw, AffineLaw, SplineLaw, make_law
from fastflow.ops.coupling import rescale

__all__ = ["Coupling", "AffineCoupling", "AdditiveCoupling", "RQSplineCoupling", "Rescale"]

_VECTOR_NETS = {"mlp": MLP, "resmlp": ResidualMLP}
_IMAGE_NETS = {"cnn": ConvNet, "resnet": ConvResNet}


def _is_range(idx: torch.Tensor) -> bool:
    return len(idx) > 0 and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx))).all())


class Coupling(Transform):
    """A coupling layer: splits by ``mask``, runs the conditioner, applies ``law`` elementwise.

    Args:
        mask: boolean ``(D,)`` or ``(C, H, W)``; True marks the features to transform
            (see :mod:`fastflow.nn.masks`). A channel mask on images feeds the conditioner the
            untouched channels only; any other image mask (e.g. checkerboard) feeds it the masked
            image ``x * ~mask``.
        conditioner: ``None`` (the default network: ``"mlp"`` for vectors, ``"cnn"`` for images),
            a name (``"mlp"``, ``"resmlp"``, ``"cnn"``, ``"resnet"``), a factory
            ``f(in_size, out_size) -> nn.Module`` or a ready module. Sizes are features for
            vectors and channels for images. The module is called as ``net(h)`` or
            ``net(h, context)``; its output has ``out_size`` features/channels.
        law: the elementwise bijection: a :class:`~fastflow.nn.laws.Law` (``AffineLaw``,
            ``AdditiveLaw``, ``SplineLaw`` or your own) or a name (``"affine"``, ``"additive"``,
            ``"spline"``, with its defaults). A subclass may instead define
            ``params_per_element`` and ``_elementwise``.
        context_features: width of the context vector (None: unconditional).
        **net_kwargs: passed to a built-in conditioner (``hidden_features``, ``num_layers``,
            ``num_blocks``, ``hidden_channels``, ``activation``, ...).
    """

    params_per_element: int = 1

    def __init__(self, mask, conditioner=None, *, law=None, context_features=None, **net_kwargs):
        super().__init__()
        self.law = make_law(law) if law is not None else None
        if self.law is not None:
            self.params_per_element = self.law.params_per_element
        mask = torch.as_tensor(mask).bool()
        if mask.dim() not in (1, 3):
            raise ValueError(f"{type(self).__name__}: mask must be (D,) or (C, H, W), got shape {tuple(mask.shape)}")
        if mask.all() or not mask.any():
            raise ValueError(f"{type(self).__name__}: mask must have both True and False entries")
        self.event_shape = tuple(mask.shape)
        self.context_features = context_features
        self.register_buffer("mask", mask, persistent=False)
        flat = mask.reshape(-1)
        self.register_buffer("tr_idx", flat.nonzero().reshape(-1), persistent=False)
        self.register_buffer("id_idx", (~flat).nonzero().reshape(-1), persistent=False)
        p = self.params_per_element
        if mask.dim() == 1:
            self.mode = "vector"
            in_size, out_size, kind = len(self.id_idx), len(self.tr_idx) * p, "mlp"
        else:
            c = mask.shape[0]
            per_channel = mask.reshape(c, -1)
            if bool((per_channel == per_channel[:, :1]).all()):
                self.mode = "channel"
                tr_ch = per_channel[:, 0]
                self.register_buffer("id_ch", (~tr_ch).nonzero().reshape(-1), persistent=False)
                self.register_buffer("tr_ch", tr_ch.nonzero().reshape(-1), persistent=False)
                self.n_tr_ch = int(tr_ch.sum())
                # Channel halves that are contiguous ranges (every channel_mask) are read as
                # views and joined with cat: no gather, no scatter, and their backward is cheap.
                self._ranges = None
                if _is_range(self.id_ch) and _is_range(self.tr_ch):
                    self._ranges = ((int(self.id_ch[0]), len(self.id_ch)), (int(self.tr_ch[0]), self.n_tr_ch))
                in_size, out_size = len(self.id_ch), self.n_tr_ch * p
            else:
                self.mode = "spatial"
                in_size, out_size = c, c * p
            kind = "cnn"
        self.net = self._make_net(conditioner if conditioner is not None else kind, in_size, out_size,
                                  context_features, net_kwargs)
        if self.law is not None:
            self.law.bind(getattr(self.net, "hidden_features", None))

    def _make_net(self, conditioner, in_size, out_size, context_features, kw):
        if isinstance(conditioner, nn.Module):
            return conditioner
        if isinstance(conditioner, str):
            table = _VECTOR_NETS if self.mode == "vector" else _IMAGE_NETS
            if conditioner not in table:
                raise ValueError(
                    f"{type(self).__name__}: conditioner={conditioner!r} for a {self.mode} mask; expected one of "
                    f"{sorted(table)}"
                )
            if self.law is not None and not getattr(self.law, "zero_init", True):
                kw = {"zero_init": False, **kw}
            return table[conditioner](in_size, out_size, context_features=context_features, **kw)
        if callable(conditioner):
            return conditioner(in_size, out_size)
        raise TypeError(f"{type(self).__name__}: conditioner must be None, a name, a factory or an nn.Module")

    def _params(self, x, context):
        b = x.shape[0]
        p = self.params_per_element
        if self.mode == "vector":
            out = call_conditioner(self.net, x.index_select(1, self.id_idx), context)
            return out.reshape(b, -1, p)
        c, h, w = self.event_shape
        out = call_conditioner(self.net, x * (~self.mask).to(x.dtype), context)
        out = out.reshape(b, c, p, h, w).permute(0, 1, 3, 4, 2).reshape(b, c * h * w, p)
        return out.index_select(1, self.tr_idx)

    def _check(self, x):
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (B, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def _run(self, x, context, inverse):
        self._check(x)
        if self.mode == "channel":
            return self._run_channels(x, context, inverse)
        b = x.shape[0]
        flat = x.reshape(b, -1)
        params = self._params(x, context)
        y_tr, lad = self._elementwise(flat.index_select(1, self.tr_idx), params, inverse)
        return flat.index_copy(1, self.tr_idx, y_tr).reshape(x.shape), lad

    def _run_channels(self, x, context, inverse):
        """Channel masks: the conditioner reads the untouched channels; its output
        ``(B, n_tr * P, H, W)`` is viewed (not copied) as ``(B, n_tr, H, W, P)`` parameters."""
        b = x.shape[0]
        _, h, w = self.event_shape
        if self._ranges is not None:
            (i0, ni), (t0, nt) = self._ranges
            x_id, x_tr = x.narrow(1, i0, ni), x.narrow(1, t0, nt)
        else:
            x_id, x_tr = x.index_select(1, self.id_ch), x.index_select(1, self.tr_ch)
        out = call_conditioner(self.net, x_id, context)
        params = out.reshape(b, self.n_tr_ch, self.params_per_element, h, w).permute(0, 1, 3, 4, 2)
        y_tr, lad = self._elementwise(x_tr, params, inverse)
        if self._ranges is None:
            return x.index_copy(1, self.tr_ch, y_tr), lad
        return torch.cat((x_id, y_tr) if i0 < t0 else (y_tr, x_id), dim=1), lad

    def forward(self, x, context=None):
        return self._run(x, context, False)

    def inverse(self, y, context=None):
        return self._run(y, context, True)

    def _elementwise(self, x_tr, params, inverse):
        """``x_tr (B, ...)``, ``params (B, ..., P)`` -> ``(y_tr (B, ...), logabsdet (B,))``
        (``(B, N)`` for vector and spatial masks, ``(B, n_tr, H, W)`` for channel masks)."""
        if self.law is None:
            raise NotImplementedError(f"{type(self).__name__}: give a law, or define _elementwise")
        return self.law(x_tr, params, inverse)


class AffineCoupling(Coupling):
    """RealNVP affine coupling ``y = x * s(x_id) + t(x_id)``: :class:`Coupling` with
    :class:`~fastflow.nn.laws.AffineLaw` (fused op ``affine_coupling``).

    Args:
        scale: how the raw conditioner output becomes the scale: ``"exp"`` (RealNVP),
            ``"softclamp"`` (``exp(clamp * tanh(raw / clamp))``, stable) or ``"sigmoid"`` (Glow).
        clamp: bound of the log-scale for ``"softclamp"``.
        backend: forces an op backend (None: the fastest available).
    """

    def __init__(self, mask, conditioner=None, *, context_features=None, scale="softclamp", clamp=2.0, backend=None,
                 **net_kwargs):
        super().__init__(mask, conditioner, law=AffineLaw(scale, clamp, backend), context_features=context_features,
                         **net_kwargs)

    @property
    def scale(self) -> str:
        return self.law.scale

    @property
    def clamp(self) -> float:
        return self.law.clamp


class AdditiveCoupling(Coupling):
    """NICE additive coupling ``y = x + t(x_id)``, volume preserving: :class:`Coupling` with
    :class:`~fastflow.nn.laws.AdditiveLaw` (fused op ``additive_coupling``)."""

    def __init__(self, mask, conditioner=None, *, context_features=None, backend=None, **net_kwargs):
        super().__init__(mask, conditioner, law=AdditiveLaw(backend), context_features=context_features, **net_kwargs)


class RQSplineCoupling(Coupling):
    """Rational-quadratic spline coupling of Neural Spline Flows: :class:`Coupling` with
    :class:`~fastflow.nn.laws.SplineLaw` (fused op ``rq_spline``).

    Args:
        num_bins: ``K`` bins of the spline on ``[-tail_bound, tail_bound]`` (identity outside).
        tail_bound, min_bin_width, min_bin_height, min_derivative: as in
            :func:`fastflow.ops.rq_spline`.
        backend: forces an op backend (None: the fastest available).

    Widths and heights are divided by ``sqrt(hidden_features)`` as in nflows; the slope
    parameters are offset so that a zero conditioner output gives slope 1 everywhere, i.e. a
    fresh layer is the identity.
    """

    def __init__(self, mask, conditioner=None, *, context_features=None, num_bins=8, tail_bound=3.0,
                 min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3, backend=None, **net_kwargs):
        law = SplineLaw(num_bins, tail_bound, min_bin_width, min_bin_height, min_derivative, backend)
        super().__init__(mask, conditioner, law=law, context_features=context_features, **net_kwargs)

    @property
    def num_bins(self) -> int:
        return self.law.num_bins

    @property
    def spline_kwargs(self) -> dict:
        return self.law.spline_kwargs


class Rescale(Transform):
    """NICE's final diagonal scaling ``y = x * exp(log_scale)`` (fused op ``rescale``), learnable."""

    def __init__(self, shape, backend=None):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(tuple(shape) if not isinstance(shape, int) else (shape,)))
        self.backend = backend

    def forward(self, x, context=None):
        return rescale(x, self.log_scale, inverse=False, backend=self.backend)

    def inverse(self, y, context=None):
        return rescale(y, self.log_scale, inverse=True, backend=self.backend)
