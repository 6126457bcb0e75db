"""``fastflow.ops.lu``: Glow's LU-parameterised invertible 1x1 convolution / linear map, and the
fused ActNorm + 1x1 convolution step.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018
(section 3.1 ActNorm, 3.2 the LU-decomposed 1x1 convolution). The weight is

    W = P L (U + diag(sign * exp(log_s)))

``P = I[perm]`` (``(P z)[i] = z[perm[i]]``, ``perm`` a long tensor permuting ``0..C-1``), ``L`` unit
lower-triangular and ``U`` strictly upper-triangular (only those parts of ``lower``/``upper`` are
read), ``sign`` a fixed +-1 vector, so ``log|det W| = sum(log_s)``; ActNorm is
``exp(an_logscale) * (x + an_bias)`` per channel (Glow's ``s * (x + b)``).

Ops, each returning ``(y, logabsdet (B,))``: :func:`lu_linear` (``x (B, C)``, ``y = x W^T``),
:func:`lu_conv1x1` (``x (B, C, H, W)``, ``W`` over the channels at every pixel) and
:func:`actnorm_conv1x1` (ActNorm then the 1x1 convolution as one per-pixel affine map, one pass
over the data). ``inverse=True`` evaluates the inverse map without inverting a general matrix:
``W^-1 = M^-1 L^-1 P^T`` from two triangular solves, or, with fewer pixels than channels, the
data solved directly. Each op's backward is a fused op (``fastflow::<op>_backward``: gradients
for ``x``, the ActNorm parameters, ``lower``, ``upper`` and ``log_s``; none for ``perm``/``sign``).
"""

from __future__ import annotations

import inspect
import math

import torch

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels.reference import lu as ref
from fastflow.kernels.torch.lu import compute_dtype as _compute_dtype
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import check_bool, check_permutation_and_signs, check_same, check_tensor, describe
from fastflow.ops._opdef import define

__all__ = ["lu_linear", "lu_conv1x1", "actnorm_conv1x1", "lu_weight", "clear_inverse_cache"]


def lu_weight(perm, lower, upper, log_s, sign) -> torch.Tensor:
    """The dense ``(C, C)`` matrix ``W = P L (U + diag(sign * exp(log_s)))`` of the factors, with
    ``(P A)[i] = A[perm[i]]`` and ``L`` unit lower: differentiable plain torch, for inspection
    (the ops never form it on the forward path of the fused backends)."""
    return ref.weight(perm, lower, upper, log_s, sign)


def clear_inverse_cache() -> None:
    """Forget every cached ``W^-1`` (they also expire by themselves when the factors change)."""
    from fastflow.kernels.torch.lu import clear_inverse_cache as clear

    clear()


# The ops (fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these)

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
              backend, need_param_grads):
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


_T = torch.Tensor  # (the forward's annotations give the op its schema)


def _lu_op(name: str, has_an: bool):
    """One of the three maps: the same kernels with or without the ActNorm arguments; the
    backward computes the parameters' gradients only when one of them needs one."""
    def full(a):  # the arguments with the ActNorm pair (None, None without ActNorm)
        return a if has_an else (a[0], None, None, *a[1:])

    if has_an:
        def forward(x: _T, an_bias: _T, an_logscale: _T, perm: _T, lower: _T, upper: _T, log_s: _T, sign: _T,
                    inverse: bool, backend: str) -> tuple[_T, _T]:
            return _forward(name, x, an_bias, an_logscale, perm, lower, upper, log_s, sign, inverse, backend)
    else:
        def forward(x: _T, perm: _T, lower: _T, upper: _T, log_s: _T, sign: _T, inverse: bool, backend: str
                    ) -> tuple[_T, _T]:
            return _forward(name, x, None, None, perm, lower, upper, log_s, sign, inverse, backend)
    params = ("an_bias", "an_logscale", "lower", "upper", "log_s") if has_an else ("lower", "upper", "log_s")
    at = [list(inspect.signature(forward).parameters).index(p) for p in params]
    return define(name, forward=forward, outputs=("like:x", "batch:x"), grads=("x",) + params,
                  # backward(grad_y, grad_lad, *forward's arguments, need_param_grads)
                  backward=lambda gy, gl, *a: _backward(name, gy, gl, *full(a[:-2]), *a[-2:]),
                  composite=lambda *a: _composite(*full(a[:-1])),  # (without the backend)
                  extra=lambda needs: (any(needs[i] for i in at),), extra_schema="bool need_param_grads")


_lu_linear_op = _lu_op("lu_linear", False)
_lu_conv1x1_op = _lu_op("lu_conv1x1", False)
_actnorm_conv1x1_op = _lu_op("actnorm_conv1x1", True)


# Argument checks
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
    check_permutation_and_signs(op, perm, sign)


# Public API
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
    return _call("lu_linear", _lu_linear_op, (2,), x, (), perm, lower, upper, log_s, sign, inverse, backend)


@_with_doc("""Glow's LU-parameterised invertible 1x1 convolution (Kingma & Dhariwal, 2018, sec. 3.2).

    Args:
        x: ``(B, C, H, W)``; ``W`` mixes the channels at every pixel.
    """, """
    Returns:
        ``(y, logabsdet)``: ``y (B, C, H, W)`` and ``logabsdet (B,)`` = ``H*W*sum(log_s)``
        (negated for the inverse). Gradients flow to ``x, lower, upper, log_s``.
    """)
def lu_conv1x1(x, perm, lower, upper, log_s, sign, *, inverse=False, backend=None):
    return _call("lu_conv1x1", _lu_conv1x1_op, (4,), x, (), perm, lower, upper, log_s, sign, inverse, backend)


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
    return _call("actnorm_conv1x1", _actnorm_conv1x1_op, (2, 4), x, (an_bias, an_logscale), perm, lower, upper, log_s,
                 sign, inverse, backend)


def _call(op, fused, x_dims, x, an, perm, lower, upper, log_s, sign, inverse, backend):
    """What every public function does after its signature: autocast, checks, backend, the op."""
    x, *an, lower, upper, log_s, sign = autocast_args(x, *an, lower, upper, log_s, sign)  # float32 under autocast
    _check(op, x, *(an or (None, None)), perm, lower, upper, log_s, sign, x_dims)
    name = resolve_backend(op, x, backend)
    inverse = check_bool(op, "inverse", inverse)
    return fused(x, *an, perm, lower, upper, log_s, sign, inverse, name)
