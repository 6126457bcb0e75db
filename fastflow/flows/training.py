"""Training helpers: maximum likelihood (forward KL) and reverse KL steps."""

from __future__ import annotations

from typing import Callable

import torch

from fastflow.flows.flow import Flow

__all__ = ["adam", "ml_loss", "ml_step", "reverse_kl_loss", "reverse_kl_step"]


def ml_loss(flow: Flow, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of ``x`` (the forward KL up to the data entropy), nats."""
    return flow.forward_kl(x, context)


def _step(loss, flow, optimizer, max_grad_norm):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def ml_step(flow: Flow, optimizer: torch.optim.Optimizer, x: torch.Tensor, context: torch.Tensor | None = None,
            max_grad_norm: float | None = None) -> float:
    """One maximum-likelihood step on the batch ``x``; returns the loss (mean NLL, nats)."""
    return _step(ml_loss(flow, x, context), flow, optimizer, max_grad_norm)


def reverse_kl_loss(flow: Flow, target_log_prob: Callable[[torch.Tensor], torch.Tensor], n: int,
                    context: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
    """Reverse KL ``E_q[log q - beta log p~]`` from ``n`` reparameterised samples of the flow."""
    return flow.reverse_kl(target_log_prob, n, context, beta)


def reverse_kl_step(flow: Flow, optimizer: torch.optim.Optimizer, target_log_prob, n: int,
                    context: torch.Tensor | None = None, beta: float = 1.0,
                    max_grad_norm: float | None = None) -> float:
    """One reverse-KL step against an unnormalised target log-density; returns the loss."""
    return _step(reverse_kl_loss(flow, target_log_prob, n, context, beta), flow, optimizer, max_grad_norm)


def adam(params, lr: float = 1e-3, weight_decay: float = 0.0, decoupled: bool = False,
         **kwargs) -> torch.optim.Optimizer:
    """Adam (AdamW with ``decoupled=True``) with its fused implementation where torch has one for
    every parameter's device and dtype (CPU and CUDA floating point), else the ``foreach`` one.

    The default ``torch.optim.Adam`` on CPU updates parameter by parameter (a dozen small kernels
    each); at the sizes flows are trained that is a sixth of a step. The fused update gives the same
    numbers (tested against the default in ``tests/flows/test_compile.py``). ``kwargs`` go to
    the optimizer (``betas``, ``eps``, ``amsgrad``...); an explicit ``fused``/``foreach`` wins.
    """
    params = list(params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    if "fused" not in kwargs and "foreach" not in kwargs:
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fusable = all(isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                      for p in tensors)
        kwargs["fused" if fusable else "foreach"] = True
    return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
