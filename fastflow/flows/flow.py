"""``Flow``: a transform from data to noise plus a base distribution (nflows' convention)."""

from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import nn

from fastflow.flows.distributions import Distribution
from fastflow.nn.base import CompositeTransform, Transform

__all__ = ["Flow"]


class Flow(nn.Module):
    """A normalizing flow ``p(x | c) = p_base(T(x; c)) |det dT/dx|``.

    Args:
        transform: a :class:`fastflow.nn.Transform` (or a list of them) mapping data to noise.
        base: the base :class:`~fastflow.flows.distributions.Distribution` over ``T(x)``.

    ``flow(x, context)`` is ``flow.log_prob(x, context)``, so a compiled flow is a compiled
    density. Samples are reparameterised: ``sample_and_log_prob`` is differentiable in the
    flow's parameters (as needed by the reverse KL).
    """

    def __init__(self, transform: Transform | list, base: Distribution, context_features: int | None | str = "any"):
        super().__init__()
        if isinstance(transform, (list, tuple)):
            transform = CompositeTransform(transform)
        self.transform = transform
        self.base = base
        self.spec: dict | None = None
        # None: unconditional (a context is an error); an int: the context width; "any": unchecked
        self.context_features = context_features

    def _check_context(self, context, batch: int | None = None) -> None:
        cf = self.context_features
        if cf == "any":
            return
        if cf is None:
            if context is not None:
                raise ValueError("this flow is unconditional (built without context_features) but a context was "
                                 f"passed (shape {tuple(context.shape)}); drop it, or build with context_features")
            return
        if context is None:
            raise ValueError(f"this flow is conditional (context_features={cf}); pass a context of shape (B, {cf})")
        if not isinstance(context, torch.Tensor) or context.dim() not in (1, 2) or context.shape[-1] != cf:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, {cf}) (or ({cf},) when sampling), got {got}")
        if batch is not None and (context.dim() != 2 or context.shape[0] != batch):
            raise ValueError(f"context must have shape ({batch}, {cf}), one row per input, got "
                             f"{tuple(context.shape)}")

    def _empty_like_params(self, *shape, like: torch.Tensor | None = None) -> torch.Tensor:
        """An empty result still attached to the parameters (so ``.sum().backward()`` works)."""
        p = next((q for q in self.parameters() if q.is_floating_point()), None)
        dtype = like.dtype if like is not None else (p.dtype if p is not None else torch.get_default_dtype())
        device = like.device if like is not None else (p.device if p is not None else None)
        out = torch.zeros(shape, dtype=dtype, device=device)
        if p is not None and p.requires_grad and torch.is_grad_enabled():
            out = out + p.reshape(-1)[:0].sum().to(dtype)
        return out

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, *shape) -> (B,)`` log-density in nats. An empty batch gives an empty result."""
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            self._check_context(context, x.shape[0])
            if x.shape[0] == 0:
                return self._empty_like_params(0, like=x)
        z, lad = self.transform(x, context=context)
        return self.base.log_prob(z, context=context) + lad

    forward = log_prob

    def _event_shape(self) -> tuple[int, ...]:
        """The data's event shape: the model's spec if it has one, else the base's."""
        spec = self.spec or {}
        if isinstance(spec.get("shape"), (tuple, list)):
            return tuple(int(s) for s in spec["shape"])
        return tuple(getattr(self.base, "shape", ()))

    def transform_to_noise(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``T(x; c)``, the noise of ``x`` under the flow."""
        return self.transform(x, context=context)[0]

    def _context(self, n, context):
        if context is None:
            return n, None, None
        if context.dim() == 1:
            return n, context.unsqueeze(0).expand(n, -1), None
        b = context.shape[0]
        return b * n, context.repeat_interleave(n, dim=0), (b, n)

    def sample_and_log_prob(self, n: int, context: torch.Tensor | None = None):
        """``n`` samples and their log-densities.

        Without context: ``(n, *shape)`` and ``(n,)``. With a context vector ``(F,)``: the same,
        all samples under it. With a batch of contexts ``(B, F)``: ``(B, n, *shape)`` and ``(B, n)``.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"number of samples must be a non-negative integer, got {n!r}")
        self._check_context(context)
        m, ctx, split = self._context(int(n), context)
        if m == 0:
            event = self._event_shape()
            lead = (0,) if split is None else split
            return self._empty_like_params(*lead, *event), self._empty_like_params(*lead)
        z, log_pz = self.base.sample_and_log_prob(m, context=ctx)
        x, lad = self.transform.inverse(z, context=ctx)
        log_p = log_pz - lad
        if split is not None:
            x = x.reshape(*split, *x.shape[1:])
            log_p = log_p.reshape(split)
        return x, log_p

    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` reparameterised samples (shapes as in :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(n, context)[0]

    # ---------------------------------------------------------------- training objectives
    def forward_kl(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Maximum-likelihood loss: mean negative log-likelihood of the data ``x`` (nats)."""
        return -self.log_prob(x, context).mean()

    def reverse_kl(self, target_log_prob: Callable[[torch.Tensor], torch.Tensor], n: int,
                   context: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
        """Reverse KL ``E_q[log q(x) - beta * log p~(x)]`` against an unnormalised target
        log-density (up to its log-normaliser), estimated from ``n`` reparameterised samples."""
        x, log_q = self.sample_and_log_prob(n, context)
        if context is not None and context.dim() == 2:
            x, log_q = x.reshape(-1, *x.shape[2:]), log_q.reshape(-1)
        return (log_q - beta * target_log_prob(x)).mean()
