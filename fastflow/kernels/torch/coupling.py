"""The coupling laws as plain torch ops (autograd differentiates them), in the inputs' dtype
(float16/bfloat16 inputs compute in float32 and round once at the end, as the fused kernels do).

Same formulas as the fused kernels: ``log s`` by the scale law, ``s = exp(log s)``; the affine
log-det is summed in the tensors' dtype, rescale's in float64 and rounded once (as the kernels).
"""

from __future__ import annotations

import math

import torch

__all__ = ["affine", "additive", "rescale"]

_LOW = (torch.float16, torch.bfloat16)


def _in_float32(fn):
    """``fn`` on 16-bit tensors computes in float32; its outputs are rounded to the input dtype once."""
    def wrapper(x, *args, **kwargs):
        if x.dtype not in _LOW:
            return fn(x, *args, **kwargs)
        up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        return tuple(o.to(x.dtype) for o in fn(x.float(), *up, **kwargs))

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_in_float32
def affine(x, shift, raw_scale, scale: str, clamp: float, inverse: bool):
    """``y = s * x + t`` (or ``x = (y - t) / s``), ``(B, ...)`` tensors; returns ``(y, logabsdet (B,))``."""
    if scale == "exp":
        logs = raw_scale
    elif scale == "softclamp":
        logs = clamp * torch.tanh(raw_scale / clamp)
    else:
        logs = torch.nn.functional.logsigmoid(raw_scale + 2.0)
    lad = logs.reshape(logs.shape[0], math.prod(logs.shape[1:])).sum(1)  # (not -1: an empty batch)
    if inverse:
        return ((x - shift) * torch.exp(-logs)).contiguous(), -lad
    return (x * torch.exp(logs) + shift).contiguous(), lad


@_in_float32
def additive(x, shift, inverse: bool):
    """``y = x + t`` (or ``x = y - t``); returns ``(y, zeros (B,))``."""
    out = (x - shift if inverse else x + shift).contiguous()
    return out, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


@_in_float32
def rescale(x, log_scale, inverse: bool):
    """NICE's scaling with ``log_scale`` already expanded to the event shape; the log-det is
    summed in float64 (as the kernels do) and rounded once."""
    lad = log_scale.sum(dtype=torch.float64).to(x.dtype)
    if inverse:
        return (x * torch.exp(-log_scale)).contiguous(), (-lad).expand(x.shape[0]).contiguous()
    return (x * torch.exp(log_scale)).contiguous(), lad.expand(x.shape[0]).contiguous()
