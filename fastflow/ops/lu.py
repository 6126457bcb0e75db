"""``fastflow.ops.lu``: Glow's LU-parameterised invertible 1x1 convolution / linear map, and the
fused ActNorm + 1x1 convolution step.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018
(section 3.1 ActNorm, 3.2 the LU-decomposed 1x1 convolution). The weight is

    W = P L (U + diag(sign * exp(log_s)))

- ``P = I[perm]``: ``(P z)[i] = z[perm[i]]``, so ``y[:, i] = (L M x)[:, perm[i]]``. ``perm`` is a
  long tensor holding a permutation of ``0..C-1``.
- ``L``: unit lower-triangular; only the strictly-lower part of ``lower`` is read.
- ``U``: strictly upper-triangular; only the strictly-upper part of ``upper`` is read.
- ``sign``: a fixed +-1 vector (floating, like the other parameters); ``log|det W| = sum(log_s)``.
- ActNorm: ``an(x) = exp(an_logscale) * (x + an_bias)`` per channel (Glow's ``s * (x + b)``).

Ops, each returning ``(y, logabsdet)`` with ``logabsdet`` of shape ``(B,)``:

- :func:`lu_linear`: ``x (B, C)``, ``y = x W^T``, ``logabsdet = sum(log_s)``.
- :func:`lu_conv1x1`: ``x (B, C, H, W)``, ``W`` over the channels at every pixel,
  ``logabsdet = H*W*sum(log_s)``.
- :func:`actnorm_conv1x1`: ``x (B, C, H, W)`` (or ``(B, C)``), ActNorm then the 1x1 convolution as
  one per-pixel affine map ``y = W diag(a) x + W diag(a) b`` (``a = exp(an_logscale)``,
  ``b = an_bias``): one pass over the data instead of two;
  ``logabsdet = H*W*(sum(an_logscale) + sum(log_s))``.

``inverse=True`` evaluates the inverse map (and the log-det of the inverse, the negative). The
inverse never inverts a general matrix: ``W^-1 = M^-1 L^-1 P^T`` comes from two triangular solves,
or, with fewer pixels than channels, the data are solved directly (no ``W^-1`` at all).

Backends (kernels/<backend>/lu.py): ``triton`` (fused kernels, float32 storage), ``numba`` (CPU,
float32/float64: the O(C^3) factor algebra compiled, forward and backward, the data pass torch's
GEMM; up to the channel limit the numba backend declares, 32), ``torch`` (the
tuned plain-PyTorch path on any device and dtype: GEMM layouts, a validated ``W^-1`` cache on
the CPU; the default where the fused backends decline) and ``reference`` (the readable oracle:
float64 on the CPU, no shortcuts).

Custom ops ``fastflow::lu_linear``, ``fastflow::lu_conv1x1``, ``fastflow::actnorm_conv1x1`` with
fake impls and autograd; their backward is ``fastflow::lu_backward`` (gradients for ``x``,
``an_bias``, ``an_logscale``, ``lower``, ``upper``, ``log_s``; none for ``perm``/``sign``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels.reference import lu as ref
from fastflow.kernels.torch.lu import compute_dtype as _compute_dtype
from fastflow.kernels.torch.lu import tensor_version as _version
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import check_bool, check_same, check_tensor, describe
from fastflow.ops._opdef import define

__all__ = ["lu_linear", "lu_conv1x1", "actnorm_conv1x1", "lu_weight", "clear_inverse_cache"]

OPS = ("lu_linear", "lu_conv1x1", "actnorm_conv1x1")


def lu_weight(perm, lower, upper, log_s, sign) -> torch.Tensor:
    """The dense ``(C, C)`` matrix ``W = P L (U + diag(sign * exp(log_s)))`` of the factors, with
    ``(P A)[i] = A[perm[i]]`` and ``L`` unit lower: differentiable plain torch, for inspection
    (the ops never form it on the forward path of the fused backends)."""
    return ref.weight(perm, lower, upper, log_s, sign)


def clear_inverse_cache() -> None:
    """Forget every cached ``W^-1`` (they also expire by themselves when the factors change)."""
    from fastflow.kernels.torch.lu import clear_inverse_cache as clear

    clear()


# --------------------------------------------------------------------------------------------
# The ops (fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these)
# --------------------------------------------------------------------------------------------


def _as3(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _forward(op, x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, backend):
    b = x.shape[0]
    n = math.prod(x.shape[2:])
    cd = _compute_dtype(x.dtype)
    lad = ref.logabsdet(log_s.to(cd), None if an_ls is None else an_ls.to(cd), n, inverse)
    lad = lad.to(x.dtype).expand(b).clone()
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format), lad
    y3 = get_kernel(op, backend).forward(_as3(x), an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    return y3.to(x.dtype).contiguous().view(x.shape), lad


def _backward(op, grad_y, grad_logabsdet, x, an_bias, an_logscale, perm, lower, upper, log_s, sign, inverse,
              need_param_grads, backend):
    """Gradients ``(x, [an_bias, an_logscale,] lower, upper, log_s)``; the parameters' are zeros
    unless ``need_param_grads``."""
    cd = _compute_dtype(x.dtype)
    g_lad_sum = grad_logabsdet.to(cd).sum()
    if x.numel() == 0:
        g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        out = [None] * 5
        if need_param_grads:  # no data: only the log-det term depends on the parameters
            g_ls = (-1.0 if inverse else 1.0) * math.prod(x.shape[2:]) * g_lad_sum
            out = [None, None if an_logscale is None else g_ls.expand(x.shape[1]), None, None, g_ls.expand(x.shape[1])]
    else:
        res = get_kernel(op, backend).backward(_as3(grad_y), g_lad_sum, _as3(x), an_bias, an_logscale, perm, lower,
                                               upper, log_s, sign, inverse, need_param_grads)
        g_x = res[0].to(x.dtype).contiguous().view(x.shape)
        out = list(res[1:])
    grads = [g_x]
    for g, t in zip(out, (an_bias, an_logscale, lower, upper, log_s)):
        if t is not None:
            grads.append(torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None
                         else g.to(t.dtype).contiguous())
    return tuple(grads)


def _composite(x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    """The map in differentiable torch ops (the reference, factor by factor)."""
    cd = _compute_dtype(x.dtype)
    c = lambda t: None if t is None else t.to(cd)  # noqa: E731
    n = math.prod(x.shape[2:])
    y3 = ref.apply_factored(_as3(x).to(cd), perm, c(lower), c(upper), c(log_s), c(sign), c(an_b), c(an_ls), inverse)
    lad = ref.logabsdet(c(log_s), c(an_ls), n, inverse).to(x.dtype).expand(x.shape[0])
    return y3.to(x.dtype).reshape(x.shape), lad


def _lu_op(name: str, forward, has_an: bool):
    """One of the three maps: the same kernels with or without the ActNorm arguments."""
    # the backward computes the parameters' gradients only when one of them needs one
    params = (1, 2, 4, 5, 6) if has_an else (2, 3, 4)
    if has_an:
        def backward(gy, gl, x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, backend, need):
            return _backward(name, gy, gl, x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need, backend)

        def composite(x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, backend):
            return _composite(x, an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    else:
        def backward(gy, gl, x, perm, lower, upper, log_s, sign, inverse, backend, need):
            return _backward(name, gy, gl, x, None, None, perm, lower, upper, log_s, sign, inverse, need, backend)

        def composite(x, perm, lower, upper, log_s, sign, inverse, backend):
            return _composite(x, None, None, perm, lower, upper, log_s, sign, inverse)
    grads = ("x", "an_bias", "an_logscale") if has_an else ("x",)
    return define(name, forward=forward, outputs=("like:x", "batch:x"), backward=backward,
                  grads=grads + ("lower", "upper", "log_s"), composite=composite,
                  extra=lambda needs: (any(needs[i] for i in params),), extra_schema="bool need_param_grads")


def _lu_linear(x: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, log_s: torch.Tensor,
               sign: torch.Tensor, inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward("lu_linear", x, None, None, perm, lower, upper, log_s, sign, inverse, backend)


def _lu_conv1x1(x: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, log_s: torch.Tensor,
                sign: torch.Tensor, inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward("lu_conv1x1", x, None, None, perm, lower, upper, log_s, sign, inverse, backend)


def _actnorm_conv1x1(x: torch.Tensor, an_bias: torch.Tensor, an_logscale: torch.Tensor, perm: torch.Tensor,
                     lower: torch.Tensor, upper: torch.Tensor, log_s: torch.Tensor, sign: torch.Tensor, inverse: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward("actnorm_conv1x1", x, an_bias, an_logscale, perm, lower, upper, log_s, sign, inverse, backend)


_lu_linear_op = _lu_op("lu_linear", _lu_linear, False)
_lu_conv1x1_op = _lu_op("lu_conv1x1", _lu_conv1x1, False)
_actnorm_conv1x1_op = _lu_op("actnorm_conv1x1", _actnorm_conv1x1, True)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

_VALIDATED: "OrderedDict[tuple, tuple]" = OrderedDict()


def _check_values(op, perm, sign) -> None:
    """perm is a permutation of 0..C-1 and sign is +-1 (data-dependent: skipped while compiling).

    A (perm, sign) pair once found valid is remembered by ``data_ptr``/``_version`` (the entry
    holds a reference, so the address cannot be reused): on GPUs a check would cost a device
    sync, on the CPU ~20 us a call. CPU hits are confirmed against a snapshot (two small
    ``torch.equal``), which also catches writes through ``.data`` that bump no version.
    """
    if torch.compiler.is_compiling():
        return
    try:
        key = tuple((t.data_ptr(), _version(t), t.stride(), t.shape, t.dtype) for t in (perm, sign)) + (perm.device,)
    except RuntimeError:  # functorch-wrapped tensors have no data pointer: check without the cache
        key = None
    hit = _VALIDATED.get(key) if key is not None else None
    if hit is not None and (perm.device.type != "cpu" or (torch.equal(hit[2], perm) and torch.equal(hit[3], sign))):
        return
    c = perm.numel()
    if not torch.equal(torch.sort(perm).values, torch.arange(c, device=perm.device, dtype=perm.dtype)):
        got = perm.tolist() if c <= 32 else describe(perm)
        raise ValueError(f"{op}: perm must be a permutation of 0..{c - 1} (each index exactly once), got {got}")
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError(f"{op}: sign must hold only +1 and -1 (the fixed signs of W's diagonal), got {describe(sign)}")
    if key is None:
        return
    snap = (perm.clone(), sign.clone()) if perm.device.type == "cpu" else (None, None)
    _VALIDATED[key] = (perm, sign, *snap)
    while len(_VALIDATED) > 256:
        _VALIDATED.popitem(last=False)


def _check(op, x, an_bias, an_logscale, perm, lower, upper, log_s, sign, x_dims):
    named = {"x": x}
    if an_bias is not None:
        named.update(an_bias=an_bias, an_logscale=an_logscale)
    named.update(lower=lower, upper=upper, log_s=log_s, sign=sign)
    for name, t in named.items():
        check_tensor(name, t, op=op)
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{op}: perm must be a torch.Tensor, got {type(perm).__name__}")
    check_same(op, named)
    if x.dim() not in x_dims:
        want = " or ".join({2: "(B, C)", 4: "(B, C, H, W)"}[d] for d in x_dims)
        raise ValueError(f"{op}: x must be {want}, got {describe(x)}")
    c = x.shape[1]
    if c < 1:
        raise ValueError(f"{op}: x needs at least one channel (dim 1), got {describe(x)}")
    for name in ("lower", "upper"):
        if tuple(named[name].shape) != (c, c):
            raise ValueError(f"{op}: {name} must be (C, C) = ({c}, {c}) with C = x.shape[1], "
                             f"got {describe(named[name])}")
    for name in ("an_bias", "an_logscale", "log_s", "sign"):
        if name in named and tuple(named[name].shape) != (c,):
            raise ValueError(f"{op}: {name} must be (C,) = ({c},) with C = x.shape[1], got {describe(named[name])}")
    if perm.dtype != torch.int64:
        raise TypeError(f"{op}: perm must be an int64 (torch.long) tensor of channel indices, got {describe(perm)}")
    if tuple(perm.shape) != (c,):
        raise ValueError(f"{op}: perm must be (C,) = ({c},) with C = x.shape[1], got {describe(perm)}")
    if perm.device != x.device:
        raise ValueError(f"{op}: perm is on device {perm.device} but x is on {x.device}; move them to one device")
    _check_values(op, perm, sign)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _with_doc(head: str, tail: str):
    """Give a public op its docstring: ``head`` + the shared argument list + ``tail`` (an
    expression after a ``def`` is not a docstring, so it is set here)."""

    def deco(fn):
        fn.__doc__ = head.rstrip() + _ARGS_DOC + tail
        return fn

    return deco


_ARGS_DOC = """
        perm: ``(C,)`` int64 permutation; ``W = P L M`` with ``P = I[perm]``, i.e.
            ``(W x)[i] = (L M x)[perm[i]]``.
        lower: ``(C, C)``; its strictly-lower part is ``L``'s (``L`` has a unit diagonal).
        upper: ``(C, C)``; its strictly-upper part is ``U``'s.
        log_s: ``(C,)``; ``M = U + diag(sign * exp(log_s))``.
        sign: ``(C,)`` of +-1, fixed (no gradient).
        inverse: evaluate the inverse map instead (its log-det is the negative).
        backend: ``None`` (fastest available), ``"reference"``, ``"numba"`` or ``"triton"``;
            ``FASTFLOW_BACKEND`` sets the default.
"""


@_with_doc("""Glow's LU-parameterised invertible linear map ``y = x W^T`` (Kingma & Dhariwal, 2018).

    Args:
        x: ``(B, C)``.
    """, """
    Returns:
        ``(y, logabsdet)``: ``y (B, C)`` and ``logabsdet (B,)`` = ``sum(log_s)`` (``-sum(log_s)``
        for the inverse), O(C). Gradients flow to ``x, lower, upper, log_s``.
    """)
def lu_linear(x, perm, lower, upper, log_s, sign, *, inverse=False, backend=None):
    x, lower, upper, log_s, sign = autocast_args(x, lower, upper, log_s, sign)  # float32 under autocast
    _check("lu_linear", x, None, None, perm, lower, upper, log_s, sign, (2,))
    name = resolve_backend("lu_linear", x, backend)
    inverse = check_bool("lu_linear", "inverse", inverse)
    return _lu_linear_op(x, perm, lower, upper, log_s, sign, inverse, name)


@_with_doc("""Glow's LU-parameterised invertible 1x1 convolution (Kingma & Dhariwal, 2018, sec. 3.2).

    Args:
        x: ``(B, C, H, W)``; ``W`` mixes the channels at every pixel.
    """, """
    Returns:
        ``(y, logabsdet)``: ``y (B, C, H, W)`` and ``logabsdet (B,)`` = ``H*W*sum(log_s)``
        (negated for the inverse). Gradients flow to ``x, lower, upper, log_s``.
    """)
def lu_conv1x1(x, perm, lower, upper, log_s, sign, *, inverse=False, backend=None):
    x, lower, upper, log_s, sign = autocast_args(x, lower, upper, log_s, sign)
    _check("lu_conv1x1", x, None, None, perm, lower, upper, log_s, sign, (4,))
    name = resolve_backend("lu_conv1x1", x, backend)
    inverse = check_bool("lu_conv1x1", "inverse", inverse)
    return _lu_conv1x1_op(x, perm, lower, upper, log_s, sign, inverse, name)


@_with_doc("""One Glow step's ActNorm followed by its LU 1x1 convolution, fused into one affine map.

    ActNorm is ``exp(an_logscale) * (x + an_bias)`` per channel (Glow's ``s * (x + b)``); with
    ``a = exp(an_logscale)`` the step is ``y = W diag(a) x + W diag(a) an_bias`` at every pixel,
    one pass over the data. The inverse is ``x = diag(1/a) W^-1 y - an_bias``.

    Args:
        x: ``(B, C, H, W)`` (or ``(B, C)``, one pixel per sample).
        an_bias: ``(C,)`` ActNorm bias ``b``.
        an_logscale: ``(C,)`` ActNorm log-scale ``log s``.
    """, """
    Returns:
        ``(y, logabsdet)``: ``y`` shaped like ``x`` and ``logabsdet (B,)`` =
        ``H*W*(sum(an_logscale) + sum(log_s))`` (negated for the inverse). Gradients flow to
        ``x, an_bias, an_logscale, lower, upper, log_s``.
    """)
def actnorm_conv1x1(x, an_bias, an_logscale, perm, lower, upper, log_s, sign, *, inverse=False, backend=None):
    x, an_bias, an_logscale, lower, upper, log_s, sign = autocast_args(
        x, an_bias, an_logscale, lower, upper, log_s, sign)
    _check("actnorm_conv1x1", x, an_bias, an_logscale, perm, lower, upper, log_s, sign, (2, 4))
    name = resolve_backend("actnorm_conv1x1", x, backend)
    inverse = check_bool("actnorm_conv1x1", "inverse", inverse)
    return _actnorm_conv1x1_op(x, an_bias, an_logscale, perm, lower, upper, log_s, sign, inverse, name)
