"""Pure-torch coupling laws: the readable oracle for every other backend.

- Affine coupling, RealNVP (Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP",
  ICLR 2017) and Glow (Kingma & Dhariwal, NeurIPS 2018): ``y = s * x + t`` elementwise, with the
  scale ``s`` obtained from a raw conditioner output ``h`` by one of :data:`SCALES`.
- Additive coupling, NICE (Dinh, Krueger & Bengio, "NICE", ICLR 2015 workshop): ``y = x + t``.
- NICE's diagonal scaling layer: ``y = exp(log_scale) * x`` with one log-scale per event element.

Every function takes ``(B, ...)`` tensors and returns a per-sample log-det of shape ``(B,)``.
The backward functions are the analytic vector-Jacobian products the fused kernels implement,
written in torch ops (tested against autograd of the forward functions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastflow.kernels.reference._precision import upcast

#: Scale parameterisations, ``h -> s``:
#:   ``"exp"``: ``s = exp(h)`` (RealNVP);
#:   ``"softclamp"``: ``s = exp(clamp * tanh(h / clamp))``, ``|log s| <= clamp`` (FrEIA, Glow-TTS);
#:   ``"sigmoid"``: ``s = sigmoid(h + 2)``, ``0 < s < 1`` (Glow's released code).
SCALES = ("exp", "softclamp", "sigmoid")


def _event_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t.clone()


def log_scale_and_slope(h: torch.Tensor, scale: str, clamp: float):
    """``(log s, d log s / d h)`` elementwise."""
    if scale == "exp":
        return h, torch.ones_like(h)
    if scale == "softclamp":
        u = torch.tanh(h / clamp)
        return clamp * u, 1.0 - u * u
    if scale == "sigmoid":
        z = h + 2.0
        return F.logsigmoid(z), torch.sigmoid(-z)
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")


def _scale_and_inverse(h: torch.Tensor, logs: torch.Tensor, scale: str):
    """``(s, 1/s)``; for ``"sigmoid"`` both in closed form (``1/s = 1 + exp(-(h+2))``), which
    stays exact where ``s`` underflows; otherwise ``exp(+-log s)``."""
    if scale == "sigmoid":
        z = h + 2.0
        return torch.sigmoid(z), 1.0 + torch.exp(-z)
    return torch.exp(logs), torch.exp(-logs)


def affine_coupling_reference(
    x: torch.Tensor, shift: torch.Tensor, raw_scale: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = s * x + t`` (or ``x = (y - t) * (1/s)``) and ``±sum(log s)`` per sample.

    Args:
        x, shift, raw_scale: ``(B, ...)``, one shape.

    Returns:
        ``(outputs (B, ...), logabsdet (B,))``.
    """
    logs, _ = log_scale_and_slope(raw_scale, scale, clamp)
    s, inv_s = _scale_and_inverse(raw_scale, logs, scale)
    if inverse:
        return (x - shift) * inv_s, -_event_sum(logs)
    return x * s + shift, _event_sum(logs)


def affine_coupling_reference_backward(
    grad_outputs: torch.Tensor, grad_logabsdet: torch.Tensor, x: torch.Tensor, shift: torch.Tensor,
    raw_scale: torch.Tensor, scale: str = "exp", clamp: float = 2.0, inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for ``x`` and ``raw_scale``; the shift's is ``grad_outputs`` (forward) or
    ``-grad x`` (inverse), which the op forms without a kernel.

    Forward: ``dy/dx = s``, ``dy/dh = x s (log s)'``, ``d lad/dh = (log s)'``.
    Inverse, ``out = (y - t)/s``: ``d out/dy = 1/s``, ``d out/dh = -out (log s)'``,
    ``d lad/dh = -(log s)'``.
    """
    logs, slope = log_scale_and_slope(raw_scale, scale, clamp)
    s, inv_s = _scale_and_inverse(raw_scale, logs, scale)
    gl = grad_logabsdet.reshape(-1, *([1] * (x.dim() - 1)))
    if inverse:
        out = (x - shift) * inv_s
        return grad_outputs * inv_s, -(grad_outputs * out + gl) * slope
    return grad_outputs * s, (grad_outputs * x * s + gl) * slope


def additive_coupling_reference(x: torch.Tensor, shift: torch.Tensor, inverse: bool = False):
    """``y = x + t`` (or ``x = y - t``); log-det zero. Returns ``(outputs, zeros (B,))``."""
    out = x - shift if inverse else x + shift
    return out, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def rescale_reference(x: torch.Tensor, log_scale: torch.Tensor, inverse: bool = False):
    """``y = exp(log_scale) * x`` (or ``x = exp(-log_scale) * y``), ``±sum(log_scale)`` per sample.

    Args:
        x: ``(B, ...)``.
        log_scale: ``x.shape[1:]`` (or broadcastable to it).
    """
    ls = log_scale.expand(x.shape[1:])
    lad = ls.sum().expand(x.shape[0])
    if inverse:
        return x * torch.exp(-ls), -lad
    return x * torch.exp(ls), lad.clone()


def rescale_reference_backward(grad_outputs, grad_logabsdet, x, log_scale, inverse: bool = False):
    """Gradients for ``x (B, ...)`` and the event-shaped ``log_scale``."""
    ls = log_scale.expand(x.shape[1:])
    sign = -1.0 if inverse else 1.0
    e = torch.exp(sign * ls)
    out = x * e
    return grad_outputs * e, sign * ((grad_outputs * out).sum(0) + grad_logabsdet.sum())


# --------------------------------------------------------------------------------------------
# The launcher interface every kernels/<backend>/coupling.py implements. Every (B, M, N) tensor
# is a strided torch view (any non-negative strides, 0 included, e.g. an expanded gradient);
# every returned tensor is new and contiguous; scale is one of SCALES; B, M, N >= 1:
#   affine_fwd(x, shift, raw_scale, scale, clamp, inverse) -> (out (B,M,N), lad (B,))
#   affine_bwd(g_out (B,M,N), g_lad (B,), x, shift, raw_scale, scale, clamp, inverse)
#       -> (grad_x (B,M,N), grad_raw_scale (B,M,N))   # grad shift: g_out, or -grad_x if inverse
#   additive_fwd(x, shift, inverse) -> out (B,M,N)
#   rescale_fwd(x (B,M,N), log_scale (M,N), inverse) -> (out (B,M,N), lad (B,))
#   rescale_bwd(g_out, g_lad, x, log_scale, inverse) -> (grad_x (B,M,N), grad_log_scale (M,N))
# Here: float64 on the CPU, half precision computed in float32 elsewhere, rounded once.
# --------------------------------------------------------------------------------------------


def affine_fwd(x, shift, raw_scale, scale, clamp, inverse):
    out, lad = affine_coupling_reference(*upcast(x, shift, raw_scale), scale, clamp, inverse)
    return out.to(x.dtype).contiguous(), lad.to(x.dtype)


def affine_bwd(g_out, g_lad, x, shift, raw_scale, scale, clamp, inverse):
    g = affine_coupling_reference_backward(*upcast(g_out, g_lad, x, shift, raw_scale), scale, clamp, inverse)
    return tuple(v.to(x.dtype).contiguous() for v in g)


def additive_fwd(x, shift, inverse):
    return additive_coupling_reference(x, shift, inverse)[0].contiguous()  # exact in any dtype: no upcast


def rescale_fwd(x, log_scale, inverse):
    out, lad = rescale_reference(*upcast(x, log_scale), inverse)
    return out.to(x.dtype).contiguous(), lad.to(x.dtype)


def rescale_bwd(g_out, g_lad, x, log_scale, inverse):
    gx, gls = rescale_reference_backward(*upcast(g_out, g_lad, x, log_scale), inverse)
    return gx.to(x.dtype).contiguous(), gls.to(x.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# The laws in the inputs' dtype (16-bit storage computed in float32, rounded once), as plain
# differentiable torch ops: the coupling ops' composite (fastflow/ops/coupling.py: for double
# backward and the functorch transforms, on upcast inputs) and, as they are, the ops' routes
# for small or nothing-to-fuse eager inputs (ROUTES in fastflow/backends.py). The same formulas
# as the fused kernels: ``log s`` by the scale law, ``s = exp(log s)``; the affine log-det is
# summed in the tensors' dtype, rescale's in float64 and rounded once (as the kernels).
# --------------------------------------------------------------------------------------------
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
def affine_in_dtype(x, shift, raw_scale, scale: str, clamp: float, inverse: bool):
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
def additive_in_dtype(x, shift, inverse: bool):
    """``y = x + t`` (or ``x = y - t``); returns ``(y, zeros (B,))``."""
    out = (x - shift if inverse else x + shift).contiguous()
    return out, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


@_in_float32
def rescale_in_dtype(x, log_scale, inverse: bool):
    """NICE's scaling with ``log_scale`` already expanded to the event shape; the log-det is
    summed in float64 (as the kernels do) and rounded once."""
    lad = log_scale.sum(dtype=torch.float64).to(x.dtype)
    if inverse:
        return (x * torch.exp(-log_scale)).contiguous(), (-lad).expand(x.shape[0]).contiguous()
    return (x * torch.exp(log_scale)).contiguous(), lad.expand(x.shape[0]).contiguous()
