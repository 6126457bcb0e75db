"""Whole-model compilation: :func:`compile` (``fastflow.compile``).

Every registered model's ``log_prob``, ``sample_and_log_prob`` and training loss trace to one
graph with no breaks (tested for each in ``tests/flows/test_compile.py``): the fused ops are
``torch.library`` custom ops with fake implementations, so ``torch.compile`` sees through the
whole model and fuses the conditioners' elementwise tails, the permutations and the base density
around them. At the sizes flows are trained (a few thousand elements per op call) this removes
most of the per-call Python and dispatch cost; on a GPU, with static shapes, ``mode=
"reduce-overhead"`` also records CUDA graphs, so a step is one graph launch instead of hundreds
of small kernel launches.

What is compiled, per method (each is its own ``torch.compile`` of the flow's method, with
``fullgraph=True`` for every model without a data-dependent loop, so a graph break there is an
error, not a silent slowdown; a layer with such a loop declares it in ``graph_breaks`` and the loop
runs eagerly between graphs):

- ``log_prob(x, context)``;
- ``sample_and_log_prob(n, context)`` and ``sample(n, context)``: the push of the base noise
  through the transforms (the noise itself is drawn eagerly, so a seed gives the same samples as
  the eager model: inductor's in-graph random numbers are another stream);
- ``train_step(optimizer, x, context)``: the mean negative log-likelihood (its forward and,
  through AOTAutograd, its backward) is compiled; gradient clipping and the optimizer step run
  eagerly (use a fused or foreach optimizer, :func:`fastflow.flows.training.adam`).

A new batch size recompiles once with a dynamic batch dimension (``dynamic=None``, torch's
default); pass ``dynamic=False`` to keep one static graph per size (what CUDA graphs need), or
``dynamic=True`` to start dynamic. The compiled methods share the flow's parameters: training
through :class:`CompiledFlow` trains ``flow``.
"""

from __future__ import annotations

import numbers

import torch

from fastflow.flows.continuous import ContinuousFlow
from fastflow.flows.flow import Flow

__all__ = ["compile", "CompiledFlow", "eager_parts"]

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _device_of(flow: torch.nn.Module) -> torch.device:
    for t in (*flow.parameters(), *flow.buffers()):
        return t.device
    return torch.device("cpu")


class CompiledFlow:
    """A flow with compiled ``log_prob``, ``sample``, ``sample_and_log_prob`` and ``train_step``
    (see :func:`compile`). ``flow`` is the eager module, sharing every parameter."""

    def __init__(self, flow: Flow, *, mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool | None = None, backend: str = "inductor"):
        if not isinstance(flow, Flow):
            raise TypeError(f"fastflow.compile: expected a fastflow Flow, got {type(flow).__name__}")
        if mode not in _MODES:
            raise ValueError(f"fastflow.compile: mode must be one of {[m for m in _MODES if m]} or None, got {mode!r}")
        if dynamic not in (None, True, False):
            raise TypeError(f"fastflow.compile: dynamic must be None, True or False, got {dynamic!r}")
        if fullgraph not in (None, True, False):
            raise TypeError(f"fastflow.compile: fullgraph must be None, True or False, got {fullgraph!r}")
        self.eager_parts = eager_parts(flow)
        if fullgraph is None:
            fullgraph = not self.eager_parts
        elif fullgraph and self.eager_parts:
            raise ValueError("fastflow.compile: fullgraph=True, but this model has parts that run eagerly between "
                             f"graphs: {'; '.join(f'{k}: {v}' for k, v in self.eager_parts.items())}; "
                             "use fullgraph=None or False")
        if mode is None:
            # CUDA graphs pay off where launches dominate and need static shapes
            mode = "reduce-overhead" if _device_of(flow).type == "cuda" and dynamic is False else "default"
        self.flow, self.mode, self.dynamic, self.fullgraph, self.backend = flow, mode, dynamic, fullgraph, backend
        options = {"fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
        if backend == "inductor":
            options["mode"] = mode
        self._log_prob = torch.compile(flow.log_prob, **options)
        self._push = torch.compile(self._push_eager, **options)
        self._loss = torch.compile(flow.forward_kl, **options)

    def __repr__(self) -> str:
        return (f"CompiledFlow({type(self.flow).__name__}, mode={self.mode!r}, dynamic={self.dynamic}, "
                f"backend={self.backend!r})")

    def parameters(self, recurse: bool = True):
        return self.flow.parameters(recurse)

    def train(self, mode: bool = True) -> "CompiledFlow":
        self.flow.train(mode)
        return self

    def eval(self) -> "CompiledFlow":
        self.flow.eval()
        return self

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``flow.log_prob(x, context)``, compiled."""
        return self._log_prob(x, context)

    __call__ = log_prob

    def _push_eager(self, z, log_pz, context):
        x, lad = self.flow.transform.inverse(z, context=context)
        return x, log_pz - lad

    def sample_and_log_prob(self, n: int, context: torch.Tensor | None = None):
        """``flow.sample_and_log_prob(n, context)``: the base noise drawn eagerly (so a seed gives
        the eager model's samples: inductor's in-graph generator draws other numbers), the push
        through the transforms compiled."""
        flow = self.flow
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"number of samples must be a non-negative integer, got {n!r}")
        flow._check_context(context)
        m, ctx, split = flow._context(int(n), context)
        if m == 0:
            return flow.sample_and_log_prob(n, context)
        z, log_pz = flow.base.sample_and_log_prob(m, context=ctx)
        x, log_p = self._push(z, log_pz, ctx)
        if split is not None:
            x, log_p = x.reshape(*split, *x.shape[1:]), log_p.reshape(split)
        return x, log_p

    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """``flow.sample(n, context)``, compiled (the same graph as :meth:`sample_and_log_prob`)."""
        if isinstance(self.flow, ContinuousFlow):  # its sampler skips the trace integral
            with self.flow.cnf.without_trace():
                return self.sample_and_log_prob(n, context)[0]
        return self.sample_and_log_prob(n, context)[0]

    def loss(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The mean negative log-likelihood of ``x`` (``flow.forward_kl``), compiled with its backward."""
        return self._loss(x, context)

    def train_step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, context: torch.Tensor | None = None,
                   max_grad_norm: float | None = None) -> torch.Tensor:
        """One maximum-likelihood step: ``zero_grad``, the compiled loss and its backward, optional
        gradient-norm clipping, ``optimizer.step()``. Returns the loss, detached (a tensor: reading
        it with ``float()`` synchronises a GPU, so read it only when you log)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x, context)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), max_grad_norm)
        optimizer.step()
        return loss.detach()


def eager_parts(flow: torch.nn.Module) -> dict[str, str]:
    """The model's layers that run eagerly between compiled graphs (a data-dependent loop: a
    numerical inverse, an ODE solve, a fixed point), by class name, with what runs eagerly."""
    return {type(m).__name__: m.graph_breaks for m in flow.modules()
            if isinstance(getattr(m, "graph_breaks", None), str)}


def compile(flow: Flow, *, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool | None = None,
            backend: str = "inductor") -> CompiledFlow:
    """Compile a fastflow model's ``log_prob``, ``sample``/``sample_and_log_prob`` and training step.

    Args:
        flow: a :class:`fastflow.Flow` (``fastflow.build(...)`` or your own composition).
        mode: ``torch.compile``'s mode. Default: ``"reduce-overhead"`` (CUDA graphs) for a model on
            a GPU with ``dynamic=False``, else ``"default"``.
        dynamic: ``None`` (static first, dynamic batch after a second size), ``True`` or ``False``.
        fullgraph: refuse graph breaks. Default: True for every model without data-dependent loops
            (all coupling, autoregressive, Glow and NICE models: one graph, tested), False for
            models with a numerical inverse, a fixed point or an ODE solve (``planar``/``radial``'s
            log_prob, ``resflow``, ``cnf``), whose loops run eagerly between graphs
            (:func:`eager_parts` names them).
        backend: ``torch.compile``'s backend (``"inductor"``; ``"aot_eager"`` to skip code generation).

    Returns:
        a :class:`CompiledFlow` whose methods run compiled and train ``flow``'s parameters.

    Example::

        flow = fastflow.build("nsf", (8,))
        fast = fastflow.compile(flow)
        opt = fastflow.flows.training.adam(flow.parameters(), lr=1e-3)
        for x in loader:
            loss = fast.train_step(opt, x)
        samples = fast.sample(1000)

    The first call of each method (and each new input shape or dtype) compiles: seconds to a
    minute, depending on the model's size. It pays off over hundreds of steps; the performance
    page lists measured step times and compile times.
    """
    return CompiledFlow(flow, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
