"""Autocast for fastflow's ops: inside ``torch.autocast`` they compute in float32.

Under ``torch.autocast`` a conditioner's ``nn.Linear``/``nn.Conv2d`` hands the ops bfloat16 or
float16 parameters while the data stay float32. The spline's knots and every log-det need float32
(a bfloat16 log-det summed over an event loses whole nats), so fastflow's ops behave like
``torch.autocast``'s float32-list ops (``softmax``, ``log``, ``sum``...): inside an autocast region
for the tensors' device, every float16/bfloat16 tensor argument is cast to float32 (float64
tensors are left alone, as autocast does), the op computes in float32 and returns float32 outputs.
Outside autocast nothing is cast, and mixed dtypes stay an error.

Two paths carry it:

- the public functions (``fastflow.ops.rq_spline``...) call :func:`autocast_args` before their
  argument checks, so eager calls (which skip the dispatcher, ``ops/_dispatch.py``), the plain
  torch routes and ``torch.compile``/``torch.export`` tracing all see float32 arguments;
- every ``fastflow::`` custom op has an autocast kernel for ``cpu`` and ``cuda``
  (:func:`register_autocast`, the same float32 cast), for graphs that call the op directly, such
  as an exported program run under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_args", "autocast_enabled", "no_autocast", "register_autocast", "LOW"]

LOW = (torch.float16, torch.bfloat16)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_enabled(device_type: str) -> bool:
    """Whether an autocast region is active for ``device_type`` (cheap outside autocast)."""
    if not torch.compiler.is_compiling() and _any_autocast is not None and not _any_autocast():
        return False
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # a device type without autocast
        return False


def autocast_args(*tensors):
    """``tensors`` unchanged outside autocast; inside an autocast region for the first tensor's
    device, with every float16/bfloat16 tensor cast to float32 (None and non-tensors pass through).

    The common case (no autocast) costs one C call.
    """
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return tensors
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW else t for t in tensors)


def register_autocast(op) -> None:
    """Give the custom op ``op`` (a ``FusedOp`` or ``CustomOpDef``) float32 autocast kernels for
    the devices that have autocast here."""
    op = getattr(op, "op", op)
    for device_type in ("cpu", "cuda"):
        if torch._C._is_autocast_available(device_type):
            op.register_autocast(device_type, torch.float32)


def no_autocast(device_type: str):
    """A context that disables autocast for ``device_type`` when it is on (else a no-op): the body
    of an op called eagerly under autocast, whose own matmuls must not drop to 16 bits."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
