"""fastflow's custom ops with an eager fast path.

Every fused op is a ``torch.library.custom_op`` (``fastflow::<name>``), which is what
``torch.compile``, ``torch.export``, fake tensors and ``opcheck`` need. In plain eager mode the
dispatcher and the autograd wrapper ``torch.library`` builds around the op cost tens of
microseconds per call, forward and backward each, more than an ``autograd.Function`` running the
same implementation. In small-batch training, such as Glow on 8x8 images, that overhead is most
of the op's time (`benchmarks/train_digits.py` measures such steps).

:func:`custom_op` therefore returns a :class:`FusedOp`: the registered op (``.op``) plus a
call that, on ordinary eager tensors, runs the same implementation directly (without autograd)
or through an ``autograd.Function`` built from the same ``setup_context``/``backward`` pair
that is registered with the op. Anything else (compiling or exporting, tracing, fake/meta or
subclass tensors, functorch transforms, dispatch or torch-function modes) goes through the
custom op, so those see exactly the registered op.

Derivatives beyond first-order reverse mode (the fused backward kernels are first-order only)
come from the op's ``composite``, its maths as differentiable torch ops (the reference):

- **Double backward** (``create_graph=True``): the backward recomputes the outputs with the
  composite and differentiates that, so second derivatives exist at every size and on every
  backend; the fused backward still runs whenever no graph of the gradient is asked for.
- **functorch transforms and forward mode** (``torch.func.grad``/``vjp``/``jacrev``/``jacfwd``/
  ``hessian``/``vmap``/``jvp``, dual tensors of ``torch.autograd.forward_ad``): the call evaluates
  the composite itself, so every transform sees plain torch ops and gives the reference's numbers
  (autograd.Function saved tensors and the custom ops' registered autograd do not compose with
  every functorch level: they gave silent zeros under ``vjp``/``jacrev``).
- **Batched gradients** (``autograd.grad(..., is_grads_batched=True)``,
  ``autograd.functional.jacobian(vectorize=True)``): the backward runs under vmap, where the fused
  kernels (numpy/Triton buffers) cannot; it differentiates the composite instead.

An op registered without a composite raises :class:`HigherOrderError` naming itself in all of
these modes: never zeros.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["custom_op", "FusedOp", "HigherOrderError"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class HigherOrderError(NotImplementedError):
    """A derivative mode (forward-mode AD, double backward) that an op does not support."""


try:
    from torch._C import _are_functorch_transforms_active as _functorch_on
    from torch._C import _get_tracing_state, _is_torch_function_mode_enabled, _len_torch_dispatch_stack
    from torch.autograd import forward_ad as _fwad
    _FAST_PROBES = True
except ImportError:  # an unknown torch: take the registered op every time (see _eager)
    _FAST_PROBES = False


def _transformed(args) -> bool:
    """Whether this call is under a functorch transform (grad, vjp, jvp, vmap, jacrev, jacfwd)
    or has a dual-tensor input of ``torch.autograd.forward_ad``."""
    if not _FAST_PROBES:
        return False
    if _functorch_on():
        return True
    if _fwad._current_level >= 0:
        return any(isinstance(a, torch.Tensor) and _fwad.unpack_dual(a).tangent is not None for a in args)
    return False


def _loop_vmap_rule(op):
    """vmap by calling ``op`` once per slice of the vmapped dimension and stacking."""

    def rule(info, in_dims, *args):
        n = info.batch_size
        outs = []
        for i in range(n):
            outs.append(op(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                             for a, d in zip(args, in_dims))))
        if isinstance(outs[0], (tuple, list)):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _functorch_active() -> bool:
    return bool(_FAST_PROBES and _functorch_on())


def _is_batched(t) -> bool:
    try:
        f = torch._C._functorch
        return bool(f.is_legacy_batchedtensor(t) or f.is_batchedtensor(t))
    except AttributeError:  # an unknown torch
        return False


def _eager(args) -> bool:
    """True when ``args`` are ordinary eager tensors that the implementation can run on as is."""
    if not _FAST_PROBES or torch.compiler.is_compiling() or _get_tracing_state() or _len_torch_dispatch_stack() \
            or _is_torch_function_mode_enabled():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or not (a.is_cpu or a.is_cuda)):
            return False
    return True


class FusedOp:
    """A ``torch.library`` custom op and its eager fast path (same implementation, same autograd).

    Attributes:
        op: the registered ``CustomOpDef`` (use it for ``torch.library.opcheck``).
        impl: the implementation function.
    """

    def __init__(self, name: str, impl: Callable, schema: str | None = None):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(name, mutates_args=(), schema=schema)(impl)
        self._function = None
        self._composite = None
        # vmap (and so jacrev/jacfwd) over the op: one call per vmapped slice unless an op
        # registers a batched rule (register_vmap)
        self.op.register_vmap(_loop_vmap_rule(self.op))

    def register_vmap(self, rule: Callable) -> None:
        """A batched vmap rule ``rule(info, in_dims, *args) -> (outputs, out_dims)``."""
        self.op.register_vmap(rule)

    def register_fake(self, fn: Callable) -> Callable:
        self.op.register_fake(fn)
        return fn

    @property
    def public_name(self) -> str:
        return "fastflow.ops." + self.name.split("::")[-1]

    def register_autograd(self, backward: Callable, *, setup_context: Callable,
                          composite: Callable | None = None) -> None:
        """Register the fused ``backward`` (and build the eager ``autograd.Function``).

        Args:
            backward, setup_context: as for ``torch.library``; ``setup_context`` must save every
                tensor input, in argument order, with ``ctx.save_for_backward`` (the composite
                backward rebuilds the arguments from them).
            composite: ``composite(*args) -> outputs``, the op's maths in differentiable torch ops;
                used for double backward, functorch transforms, forward mode and batched
                gradients (see the module docstring).
        """
        op_name = self.public_name
        self._composite = composite

        def setup(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.fastflow_args = tuple(_TENSOR if isinstance(a, torch.Tensor) else a for a in inputs)

        def backward_any_order(ctx, *grads):
            if _any_autocast():  # a backward called inside an autocast region: the kernels' precision
                with _autocast_off(grads):
                    return _backward_any_order(ctx, *grads)
            return _backward_any_order(ctx, *grads)

        def _backward_any_order(ctx, *grads):
            # is_grads_batched / jacobian(vectorize=True): the gradients are (legacy) batched tensors
            batched = _functorch_active() or any(_is_batched(g) for g in grads if g is not None)
            if not batched and not torch.is_grad_enabled():
                return backward(ctx, *grads)
            # create_graph=True (the gradient itself must be differentiable) or batched gradients
            if composite is None:
                raise HigherOrderError(
                    f"{op_name}: {'batched gradients' if batched else 'double backward (create_graph=True)'} "
                    "are not supported: its backward is a fused first-order kernel")
            return _composite_backward(ctx, grads, composite)

        self.op.register_autograd(backward_any_order, setup_context=setup)
        name = self.name.split("::")[-1].title().replace("_", "") + "Function"
        impl = self.impl

        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips
        # binding the arguments to forward's signature (inspect, ~30 us a call).
        self._function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_any_order),
        })

    def __call__(self, *args):
        # The common case first, with each probe once: ordinary eager tensors, no transform, no
        # dual tensors, no compile/trace/modes (a few C calls; this runs on every op call).
        if _FAST_PROBES and not _functorch_on() and _fwad._current_level < 0 and not torch.compiler.is_compiling() \
                and not _get_tracing_state() and not _len_torch_dispatch_stack() \
                and not _is_torch_function_mode_enabled() and not _any_autocast():
            grad = False
            for a in args:
                if isinstance(a, torch.Tensor):
                    if type(a) not in _PLAIN or not (a.is_cpu or a.is_cuda):
                        return self.op(*args)  # subclasses, meta/fake or other devices
                    grad = grad or a.requires_grad
            if grad and torch.is_grad_enabled():
                # without registered autograd, the op itself says that it has none
                return self.op(*args) if self._function is None else self._function.apply(*args)
            return self.impl(*args)
        if not torch.compiler.is_compiling() and _any_autocast():
            # The public functions already cast 16-bit arguments to float32 (ops/_autocast.py);
            # the op's body must not run its own matmuls in 16 bits either (the torch LU maps)
            with _autocast_off(args):
                return self._call(args)
        return self._call(args)

    def _call(self, args):
        if not torch.compiler.is_compiling() and _transformed(args):
            # functorch transforms and forward-mode AD: the composite's plain torch ops (the
            # reference maths), which every transform composes with
            if self._composite is None:
                raise HigherOrderError(
                    f"{self.public_name}: functorch transforms and forward-mode AD are not supported "
                    "(no composite registered)")
            return self._composite(*args)
        if not _eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.op(*args) if self._function is None else self._function.apply(*args)
        return self.impl(*args)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_off(args):
    """Autocast off for the device of the first tensor in ``args``."""
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    return torch.autocast(device, enabled=False)


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorSlot()


def _saved_args(ctx) -> list:
    saved = iter(ctx.saved_tensors)
    return [next(saved) if a is _TENSOR else a for a in ctx.fastflow_args]


def _composite_backward(ctx, grads, composite):
    """Gradients by autograd through ``composite`` on the saved inputs, with ``create_graph``."""
    args = _saved_args(ctx)
    needs = list(ctx.needs_input_grad)
    with torch.enable_grad():
        local = list(args)
        wrt = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and needs[i]:
                if not a.requires_grad:
                    local[i] = a.detach().requires_grad_()
                wrt.append(i)
        outs = composite(*local)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        result = [None] * len(args)
        if wrt and pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [local[i] for i in wrt], [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
            for i, g in zip(wrt, got):
                result[i] = g if g is not None else torch.zeros_like(args[i])
    return tuple(result)


def custom_op(name: str) -> Callable[[Callable], FusedOp]:
    """Decorator: ``@custom_op("fastflow::name")`` over a fully annotated implementation
    (``mutates_args=()``: fastflow's ops never write to their inputs)."""

    def deco(fn: Callable) -> FusedOp:
        return FusedOp(name, fn)

    return deco
