"""The oracle's compute precision, shared by the reference kernels."""

from __future__ import annotations

import torch


def upcast(*ts):
    """``ts`` in the oracle's compute dtype: float64 on the CPU (so that the oracle is at least as
    accurate as any float32 kernel), float32 for half precision elsewhere, else unchanged; None
    passes through. Callers round once at the end."""
    first = next(t for t in ts if t is not None)
    cpu = first.device.type == "cpu"
    return [t if t is None else (t.double() if cpu else (t.float() if t.dtype in (torch.float16, torch.bfloat16)
                                                         else t)) for t in ts]
