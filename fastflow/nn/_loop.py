"""``while_loop``: one loop for eager and ``torch.export``.

``torch._higher_order_ops.while_loop`` runs as a Python loop in eager mode and is traced by
``torch.export`` as one loop node (no host sync, iterations decided at run time), so an iterative
solve (a bisection, a fixed point) is written once and exports as it runs.

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
    tensors whose shapes and dtypes the body keeps)."""
    if torch.compiler.is_exporting():
        try:
            from torch._C._dynamo.eval_frame import reset_code
        except ImportError:  # another torch: nothing cached to drop, or nothing we can drop
            reset_code = None
        for code in _WRAPPERS if reset_code else ():
            reset_code(code)
    return _torch_while_loop(cond, body, tuple(carry))
