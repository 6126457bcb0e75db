"""``while_loop``: one loop for eager and ``torch.export``.

An iterative solve (a bisection, a fixed point, an adaptive ODE solve) is written once as a
``cond``/``body`` pair over a tuple of tensors. Under ``torch.export`` it becomes torch's
``while_loop`` higher-order op: one loop node in the program, no host sync, the iteration count
decided at run time. Eagerly it is a plain Python loop over the same two functions: torch's own
eager ``while_loop`` compiles its wrapper with dynamo (0.6 s on the first call, then 3x the plain
loop's time for planar's bisection), which eager callers should not pay.

One torch quirk is handled here: export traces the loop through a wrapper function that dynamo
caches by its code object, and a cache entry left by an earlier export with a fixed batch size
makes a later dynamic-batch export specialise the batch to that size ("Constraints violated").
Before each traced loop those wrapper code objects' cache entries are dropped (only theirs: the
caller's own ``torch.compile`` caches are untouched).
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.while_loop import while_loop as _torch_while_loop

__all__ = ["while_loop"]


def _wrapper_codes():
    return tuple(c for c in _torch_while_loop.__code__.co_consts
                 if hasattr(c, "co_name") and c.co_name.startswith("_while_loop"))


_WRAPPERS = _wrapper_codes()


def while_loop(cond, body, carry):
    """``while cond(*carry): carry = body(*carry)``; returns the final ``carry`` (a tuple of
    tensors whose shapes and dtypes the body keeps; ``cond`` returns a 0-dim bool tensor)."""
    carry = tuple(carry)
    if not torch.compiler.is_exporting():
        while bool(cond(*carry)):
            carry = tuple(body(*carry))
        return carry
    try:
        from torch._C._dynamo.eval_frame import reset_code
    except ImportError:  # another torch: nothing cached to drop, or nothing we can drop
        reset_code = None
    for code in _WRAPPERS if reset_code else ():
        reset_code(code)
    return _torch_while_loop(cond, body, carry)
