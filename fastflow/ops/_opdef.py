"""The op definition: what every fused op declares once, and the glue generated from it.

An op module writes its implementation (``forward``: the annotated function the custom op runs,
which picks the backend's kernel), its fused backward (``backward``) and its maths in torch ops
(``composite``, the reference), and calls :func:`define`. From those and the declared
``outputs``/``grads`` this module builds, the same way for every op:

- the forward custom op ``fastflow::<name>`` (schema inferred from ``forward``'s annotations) and
  its fake impl (shapes from ``outputs``);
- the backward custom op ``fastflow::<name>_backward``: the incoming gradient of every output,
  then the forward's arguments (then ``extra``'s), returning the gradients of ``grads`` in order;
  its schema is the forward's with those prepended, its fake impl shapes each gradient like its
  input;
- the autograd pair: ``setup_context`` saves every tensor argument (nothing else: the backward
  recomputes what it needs), ``backward`` fills missing output gradients with zeros, calls the
  backward op and puts its gradients at their arguments' positions;
- the composite, registered for double backward, functorch transforms, forward mode and batched
  gradients, and the eager fast path (:class:`fastflow.ops._dispatch.FusedOp`).

Hooks, only where an op really differs: ``derived`` (gradients that need no kernel: the affine
law's shift gradient, the additive law's identity backward, which then has no backward op at
all) and ``extra`` (more arguments for the backward op from ``ctx.needs_input_grad``: the LU
maps' switch that skips the parameters' gradients).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from fastflow.ops._dispatch import FusedOp, _saved_args

__all__ = ["define", "fake_outputs"]


def fake_outputs(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Callable:
    """The fake impl of an op whose arguments are named ``inputs`` and whose outputs are
    ``"like:<arg>"`` (that argument's shape, contiguous) or ``"batch:<arg>"`` (its leading
    dimension)."""
    where = []
    for o in outputs:
        kind, _, name = o.partition(":")
        if kind not in ("like", "batch") or name not in inputs:
            raise ValueError(f"output {o!r}: expected 'like:<arg>' or 'batch:<arg>' with <arg> among {inputs}")
        where.append((kind == "like", inputs.index(name)))

    def fake(*args):
        return tuple(torch.empty_like(args[i], memory_format=torch.contiguous_format) if like
                     else args[i].new_empty((args[i].shape[0],)) for like, i in where)

    return fake


def _zero_fillers(params: tuple[str, ...], outputs: tuple[str, ...]) -> list:
    """Per output, ``fill(args) -> zeros`` shaped as that output (for a gradient autograd left None)."""
    out = []
    for o in outputs:
        kind, _, name = o.partition(":")
        i = params.index(name)
        out.append((lambda a, i=i: torch.zeros_like(a[i])) if kind == "like"
                   else (lambda a, i=i: a[i].new_zeros((a[i].shape[0],))))
    return out


def define(name: str, *, forward: Callable, outputs: tuple[str, ...], composite: Callable | None,
           backward: Callable | None = None, grads: tuple[str, ...] = (), derived: Callable | None = None,
           extra: Callable | None = None, extra_schema: str = "") -> FusedOp:
    """Generate the op ``fastflow::<name>`` (see the module docstring); returns its :class:`FusedOp`.

    Args:
        forward: the implementation, fully annotated (its parameter names are the op's).
        outputs: per output, ``"like:<arg>"`` or ``"batch:<arg>"`` (see :func:`fake_outputs`).
        composite: ``composite(*args) -> outputs`` in differentiable torch ops, or None (those
            derivative modes then raise ``HigherOrderError``).
        backward: the fused backward ``backward(*grad_outputs, *args, *extra) -> gradients of
            grads`` (a tuple, in ``grads``' order); None when ``derived`` gives every gradient.
        grads: the tensor arguments ``backward`` returns gradients for.
        derived: ``derived(args, grad_outputs, result)`` fills ``result`` (a list, one slot per
            argument) for gradients that need no kernel; ``grad_outputs`` are zero-filled only
            when there is a ``backward``.
        extra: ``extra(needs_input_grad) -> tuple`` of trailing arguments for ``backward``,
            declared in ``extra_schema`` (e.g. ``"bool need_param_grads"``).
    """
    params = tuple(inspect.signature(forward).parameters)
    for g in grads:
        if g not in params:
            raise ValueError(f"op {name!r}: grads names {g!r}, not an argument of its forward {params}")
    fused = FusedOp(f"fastflow::{name}", forward)
    fused.register_fake(fake_outputs(params, outputs))
    n_args = len(params)

    bwd_op = None
    if backward is not None:
        if not grads:
            raise ValueError(f"op {name!r}: a backward needs the names of the arguments it differentiates (grads)")
        head, _, _ = torch.library.infer_schema(forward, mutates_args=()).rpartition(" -> ")
        g_names = tuple(f"grad_output{i}" for i in range(len(outputs)))
        schema = "(" + ", ".join([f"Tensor {g}" for g in g_names] + [head[1:-1]]
                                 + ([extra_schema] if extra_schema else [])) + ")"
        schema += " -> (" + ", ".join(["Tensor"] * len(grads)) + ")"
        bwd_op = FusedOp(f"fastflow::{name}_backward", backward, schema=schema)
        extra_names = tuple(p.split()[-1].split("=")[0] for p in extra_schema.split(",") if p.strip())
        bwd_op.register_fake(fake_outputs(g_names + params + extra_names, tuple(f"like:{g}" for g in grads)))
    fillers = _zero_fillers(params, outputs)
    grad_at = tuple(params.index(g) for g in grads)

    def setup_context(ctx, inputs, output):
        # every tensor argument, in order: what _saved_args rebuilds the arguments from
        ctx.save_for_backward(*[a for a in inputs if isinstance(a, torch.Tensor)])

    def autograd_backward(ctx, *grad_outputs):
        args = _saved_args(ctx)
        result = [None] * n_args
        if bwd_op is not None:
            grad_outputs = [fill(args) if g is None else g for g, fill in zip(grad_outputs, fillers)]
            if extra is None:
                got = bwd_op(*grad_outputs, *args)
            else:
                got = bwd_op(*grad_outputs, *args, *extra(ctx.needs_input_grad))
            for i, g in zip(grad_at, got):
                result[i] = g
        if derived is not None:
            derived(args, grad_outputs, result)
        return tuple(result)

    fused.register_autograd(autograd_backward, setup_context=setup_context, composite=composite)
    fused.backward_op = bwd_op
    return fused
