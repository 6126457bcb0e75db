"""fastflow's custom ops with an eager fast path.

Every fused op is a ``torch.library.custom_op`` (``fastflow::<name>``), which is what
``torch.compile``, ``torch.export``, fake tensors and ``opcheck`` need. In plain eager mode the
dispatcher and the autograd wrapper ``torch.library`` builds around the op cost ~50-100 us per
call, forward and backward each (measured on the CI machine: an affine coupling forward+backward
on a 128 x 16 batch took 380 us through the custom op, 245 us through an ``autograd.Function``
running the same implementation, and 120 us as plain PyTorch ops). In small-batch training,
such as Glow on 8x8 images, that overhead is most of the op's time.

:func:`custom_op` therefore returns a :class:`FusedOp`: the registered op (``.op``) plus a
call that, on ordinary eager tensors, runs the same implementation directly (without autograd)
or through an ``autograd.Function`` built from the same ``setup_context``/``backward`` pair
that is registered with the op. Anything else (compiling or exporting, tracing, fake/meta or
subclass tensors, functorch transforms, dispatch or torch-function modes) goes through the
custom op, so those see exactly the registered op.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["custom_op", "FusedOp"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _modes_active() -> bool:
    try:
        return bool(
            torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()
        )
    except AttributeError:  # an unknown torch: take the registered op every time
        return True


def _eager(args) -> bool:
    """True when ``args`` are ordinary eager tensors that the implementation can run on as is."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() or _modes_active():
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

    def __init__(self, name: str, impl: Callable):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self._function = None

    def register_fake(self, fn: Callable) -> Callable:
        self.op.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        name = self.name.split("::")[-1].title().replace("_", "") + "Function"
        impl = self.impl

        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips
        # binding the arguments to forward's signature (inspect, ~30 us a call).
        self._function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        if not _eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # without registered autograd, the op itself says that it has none
            return self.op(*args) if self._function is None else self._function.apply(*args)
        return self.impl(*args)


def custom_op(name: str) -> Callable[[Callable], FusedOp]:
    """Decorator: ``@custom_op("fastflow::name")`` over a fully annotated implementation
    (``mutates_args=()``: fastflow's ops never write to their inputs)."""

    def deco(fn: Callable) -> FusedOp:
        return FusedOp(name, fn)

    return deco
