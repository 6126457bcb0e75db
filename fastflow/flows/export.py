"""Exporting a flow with ``torch.export``: programs that run without fastflow's model code.

Two small modules wrap a flow so that ``torch.export.export`` sees tensors in and tensors out:

- :class:`LogProb`: ``(x, context=None) -> log_prob (B,)``;
- :class:`Sampler`: ``(eps, context=None) -> (x, log_prob)``, where ``eps (B, *shape)`` is standard
  normal noise drawn by the caller (``torch.randn``). The noise is an input, not drawn inside the
  graph: the program is then a pure function (reproducible, batch size from the input, no
  generator state baked in). For the normal bases ``eps`` is exactly what the flow's own sampling
  draws (``Sampler(flow)(torch.randn(n, *shape))`` equals ``flow.sample_and_log_prob(n)`` under
  the same seed); for the logistic base (``nice``) it is mapped through the normal CDF and the
  logistic quantile, which is a logistic sample too (for the box-uniform base of ``ncsf``, through the
  normal CDF onto the box). With a context ``(B, F)`` each row of ``eps``
  is sampled under its row of the context.

:func:`export_flow` builds either and calls ``torch.export.export`` with a fixed or dynamic batch
dimension. The exported program calls aten ops and ``fastflow::`` custom ops; running it needs only
``import fastflow.ops`` (or :func:`fastflow.ops.load_exported`). The backend each fused op ran on at
export time is a constant of the graph: export on the kind of device you deploy to.

What exports: every registered model. Closed-form transforms (nsf, nsf-ar, maf, iaf, realnvp,
realnvp-image, nice, glow) trace as they are; iterative solves are written as loops that
``torch.export`` traces as one ``while_loop`` node running until converged, the same iteration
as eager (:mod:`fastflow.nn._loop`): planar's bisection inverse (radial's is closed form),
resflow's fixed-point inverse, cnf's ODE solve (:mod:`fastflow.nn._ode`: torchdiffeq's dopri5
step control and fixed grids restated without host syncs). Log-dets that eager takes with
autograd inside the forward are closed form here: resflow's Jacobian of its Lipschitz MLP, cnf's
trace of its vector field's Jacobian. Random estimators cannot be exported (resflow's series,
cnf's Hutchinson trace: the training-mode defaults), so export in eval mode, where D <= 64 picks
the exact routes; otherwise :func:`export_flow` raises :class:`NotExportableError` naming the
setting to change. Inside a program there is no host sync, so where eager raises on data (a
non-finite input to a numerical inverse, a solve that does not converge) the program returns
that row non-finite, and NaN for the whole batch where the iteration itself fails (an adaptive
ODE solve over ``max_num_steps``, resflow's fixed point not converged in ``max_iter``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastflow.flows.distributions import BoxUniform, DiagonalNormal, StandardLogistic, StandardNormal
from fastflow.flows.flow import Flow

__all__ = ["LogProb", "Sampler", "export_flow", "NotExportableError", "WHAT"]

WHAT = ("log_prob", "sample")
class NotExportableError(RuntimeError):
    """This flow cannot be exported with ``torch.export`` (the reason names the part that stops it)."""


class LogProb(nn.Module):
    """``forward(x, context=None) -> flow.log_prob(x, context)``, ``(B, *shape) -> (B,)``."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.flow.log_prob(x, context)


def _base_sample(base, eps: torch.Tensor, context):
    """The base sample and its log-density for standard normal noise ``eps (B, *shape)``."""
    if isinstance(base, DiagonalNormal):  # also ConditionalDiagonalNormal
        loc, log_scale = base._params(context, eps.shape[0])
        z = loc + torch.exp(log_scale) * eps
        return z, base.log_prob(z, context)
    if isinstance(base, StandardNormal):
        return eps, base.log_prob(eps)
    if isinstance(base, StandardLogistic):
        # u = Phi(eps) is uniform; the logistic quantile log(u) - log(1 - u), written with log_ndtr
        # for both tails so that |eps| up to ~37 stays finite in float32
        z = torch.special.log_ndtr(eps) - torch.special.log_ndtr(-eps)
        return z, base.log_prob(z)
    if isinstance(base, BoxUniform):  # u = Phi(eps), uniform on [0, 1]
        z = base.low + (base.high - base.low) * torch.special.ndtr(eps)
        return z, base.log_prob(z)
    raise NotExportableError(f"Sampler: base distribution {type(base).__name__} has no standard-normal "
                             "reparameterisation here; export log_prob, or sample in Python")


class Sampler(nn.Module):
    """``forward(eps, context=None) -> (x, log_prob)``: samples of the flow from standard normal
    noise ``eps (B, *shape)`` (see the module docstring), ``x (B, *shape)``, ``log_prob (B,)``."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, eps: torch.Tensor, context: torch.Tensor | None = None):
        shape = eps.shape
        z, log_pz = _base_sample(self.flow.base, eps.reshape(shape[0], *self.flow.base.shape), context)
        x, lad = self.flow.transform.inverse(z, context=context)
        return x.reshape(shape[0], *x.shape[1:]), log_pz - lad


def _model_name(flow) -> str | None:
    spec = getattr(flow, "spec", None) or {}
    return spec.get("name") or spec.get("model")


def export_flow(flow: Flow, what: str = "log_prob", batch: int = 2, dynamic_batch: bool = False,
                context: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``flow``'s log-density or sampler.

    Args:
        flow: a fastflow flow (put it in eval mode first if it has training-only behaviour).
        what: ``"log_prob"`` (:class:`LogProb`) or ``"sample"`` (:class:`Sampler`).
        batch: the batch size of the example inputs (the fixed batch of a static export).
        dynamic_batch: export the batch dimension as dynamic (any size >= 1).
        context: an example context ``(batch, F)`` for a conditional flow (default: zeros).
        dtype, device: of the example inputs (default: the flow's parameters').

    Returns:
        the ``ExportedProgram``: ``program.module()(x)`` (``(x, context)`` for a conditional flow;
        ``eps`` for the sampler); ``torch.export.save(program, path)`` writes it.

    Raises:
        ValueError: ``what`` is not one of :data:`WHAT`.
        NotExportableError: a layer cannot be traced in its current configuration (the message says
            which and what to change: e.g. a random log-det estimator in training mode).
    """
    if what not in WHAT:
        raise ValueError(f"export_flow: what={what!r}, expected one of {WHAT}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"export_flow: batch must be a positive integer, got {batch!r}")
    name = _model_name(flow)
    if dynamic_batch:
        batch = max(batch, 2)  # torch.export specialises a size-1 example dimension to 1
    p = next(flow.parameters(), None)
    dtype = dtype or (p.dtype if p is not None else torch.float32)
    device = device or (p.device if p is not None else "cpu")
    shape = flow._event_shape()
    cf = flow.context_features
    if isinstance(cf, int) and context is None:
        context = torch.zeros(batch, cf, dtype=dtype, device=device)
    if what == "log_prob":
        module = LogProb(flow)
        example = torch.randn(batch, *shape, dtype=dtype, device=device)
    else:
        module = Sampler(flow)
        example = torch.randn(batch, math.prod(shape), dtype=dtype, device=device).reshape(batch, *shape)
    # an unconditional program takes the one tensor (no None to pass at every call)
    args = (example,) if context is None else (example, context)
    dynamic_shapes = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: b} for _ in args)
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except NotExportableError:
        raise
    except Exception as exc:  # torch's own message is long; keep its first line and say what failed
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotExportableError(f"{name or type(flow).__name__}: torch.export of {what} "
                                 f"({'dynamic' if dynamic_batch else 'fixed'} batch) failed: "
                                 f"{type(exc).__name__}: {first_line}") from exc
