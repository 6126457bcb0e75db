"""``fastflow.ops.polynomial``: monotone polynomial laws, elementwise.

:func:`sos_polynomial`: the sum-of-squares polynomial law of Sum-of-Squares Polynomial Flow
(Jaini et al. 2019), element for element zuko's ``SOSPolynomialTransform`` (zuko's ``SOSPF``,
sbi's ``zuko_sospf``), one custom op ``fastflow::sos_polynomial`` (maths:
``kernels/reference/sos.py``).

:func:`bernstein`: the Bernstein polynomial law of Bernstein-Polynomial Normalizing Flows
(Ramasinghe et al. 2021; Arpogaus et al. 2022), element for element zuko's
``BoundedBernsteinTransform`` (zuko's ``BPF``, sbi's ``zuko_bpf``). One custom op
``fastflow::bernstein``, its backward the fused ``fastflow::bernstein_backward`` that recomputes
the forward (or the inverse's root) from the inputs. The maths and the gradients' derivation:
``kernels/reference/bernstein.py``.
"""

from __future__ import annotations

import torch

from fastflow.backends import get_kernel, resolve_backend
from fastflow.kernels.reference._precision import upcast
from fastflow.kernels.reference import sos as _sos_ref
from fastflow.kernels.reference.bernstein import MAX_PARAMS, evaluate
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import (CheckMemo, broadcasts_to, check_bool, check_elementwise, check_positive_float,
                                  check_same, check_tensor, describe)
from fastflow.ops._opdef import define

__all__ = ["bernstein", "sos_polynomial", "MAX_PARAMS", "MAX_SOS_DEGREE"]

OP = "bernstein"


# The op: fastflow/ops/_opdef.py generates the custom ops, fakes and autograd from these.
def _forward(inputs: torch.Tensor, theta: torch.Tensor, inverse: bool, bound: float, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    return get_kernel(OP, backend).forward(inputs, theta, inverse, bound)


def _backward(grad_outputs, grad_logabsdet, inputs, theta, inverse, bound, backend):
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.zeros_like(theta)
    return tuple(get_kernel(OP, backend).backward(grad_outputs, grad_logabsdet, inputs, theta, inverse, bound))


def _composite(x, theta, inverse, bound, backend):  # the reference, in differentiable torch ops
    out, lad = evaluate(*upcast(x, theta), inverse, bound)
    return out.to(x.dtype), lad.to(x.dtype)


_bernstein_op = define(OP, forward=_forward, outputs=("like:inputs", "like:inputs"), backward=_backward,
                       grads=("inputs", "theta"), composite=_composite)

# Public API
_MEMO = CheckMemo()


def _check_all(inputs, theta, bound):
    check_elementwise(OP, {"inputs": inputs, "theta": theta})
    n = theta.shape[-1]
    if not 2 <= n <= MAX_PARAMS:
        raise ValueError(f"{OP}: theta must have 2..{MAX_PARAMS} raw coefficients in its last dim (degree n + 4), "
                         f"got {describe(theta)}")
    return check_positive_float(OP, "bound", bound)


def bernstein(inputs: torch.Tensor, theta: torch.Tensor, *, inverse: bool = False, bound: float = 5.0,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bernstein polynomial law, elementwise (zuko's ``BoundedBernsteinTransform(theta, bound)``).

    With ``x' = (x + B) / (2B)``, the map is the Bernstein polynomial of degree ``M = n + 4``
    whose increasing coefficients are ``-B`` plus the cumulated steps ``(d, d, softmax(theta) *
    (2B - 4d), d, d)``, ``d = 2B / M``: slope 1 and curvature 0 at both ends, the identity
    (slope 1, zuko's offsets) outside ``[-B, B]``. The inverse is solved to the float64
    resolution (Newton in a bisection bracket); its gradients are the implicit function's.

    Args:
        inputs: ``(...)`` values to transform.
        theta: ``(..., n)`` raw coefficients, ``2 <= n <= 507``; leading dims equal to
            ``inputs.shape`` or broadcastable to it.
        inverse: evaluate the inverse map instead.
        bound: the polynomial's domain ``[-B, B]``.
        backend: ``None`` (fastest available), ``"reference"`` or ``"numba"``;
            ``FASTFLOW_BACKEND`` sets the default.

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape`` and dtype. A NaN input gives NaN in
        both at that element only; an empty input gives empty outputs.
    """
    inputs, theta = autocast_args(inputs, theta)  # float32 under autocast
    bound = _MEMO.check(_check_all, (inputs, theta), (bound,))
    name = resolve_backend(OP, inputs, backend, caller=OP)
    inverse = check_bool(OP, "inverse", inverse)
    if theta.shape[:-1] != inputs.shape:  # broadcast: a view; autograd sums the gradient back
        theta = theta.expand(*inputs.shape, theta.shape[-1])
    return _bernstein_op(inputs, theta, inverse, bound, name)


# --------------------------------------------------------------------------------------------
# The sum-of-squares polynomial law
# --------------------------------------------------------------------------------------------

SOS = "sos_polynomial"
MAX_SOS_DEGREE = 31  # L: powers of x / B up to 2L + 1


def _sos_forward(inputs: torch.Tensor, a: torch.Tensor, inverse: bool, bound: float, slope: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.empty_like(inputs)
    return get_kernel(SOS, backend).forward(inputs, a, inverse, bound, slope)


def _sos_backward(grad_outputs, grad_logabsdet, inputs, a, inverse, bound, slope, backend):
    if inputs.numel() == 0:
        return torch.empty_like(inputs), torch.zeros_like(a)
    return tuple(get_kernel(SOS, backend).backward(grad_outputs, grad_logabsdet, inputs, a, inverse, bound, slope))


def _sos_composite(x, a, inverse, bound, slope, backend):
    out, lad = _sos_ref.evaluate(*upcast(x, a), inverse, bound, slope)
    return out.to(x.dtype), lad.to(x.dtype)


_sos_op = define(SOS, forward=_sos_forward, outputs=("like:inputs", "like:inputs"), backward=_sos_backward,
                 grads=("inputs", "a"), composite=_sos_composite)
_SOS_MEMO = CheckMemo()


def _sos_check_all(inputs, a, bound, slope):
    check_tensor("inputs", inputs, op=SOS)
    check_tensor("a", a, op=SOS)
    check_same(SOS, {"inputs": inputs, "a": a})
    if a.dim() < 2:
        raise ValueError(f"{SOS}: a must be (..., K, L + 1): K polynomials of degree L, got {describe(a)}")
    if a.shape[-2] < 1 or not 1 <= a.shape[-1] <= MAX_SOS_DEGREE + 1:
        raise ValueError(f"{SOS}: a must have K >= 1 polynomials of degree 0..{MAX_SOS_DEGREE} in its last two "
                         f"dims, got {describe(a)}")
    if not broadcasts_to(a.shape[:-2], inputs.shape):
        raise ValueError(f"{SOS}: a must have leading shape {tuple(inputs.shape)} (that of inputs, or "
                             f"broadcastable to it) plus (K, L + 1), got {describe(a)}")
    bound = check_positive_float(SOS, "bound", bound)
    slope = check_positive_float(SOS, "slope", slope)
    return bound, slope


def sos_polynomial(inputs: torch.Tensor, a: torch.Tensor, *, inverse: bool = False, bound: float = 10.0,
                   slope: float = 1e-3, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum-of-squares polynomial law, elementwise (zuko's ``SOSPolynomialTransform(a, slope)``).

    ``f(x) = int_0^x g(u) du`` with ``g(u) = slope + (1/K) sum_k (1 + sum_j a_(k,j) (u/B)^j)^2``:
    increasing on the whole line, computed in closed form (zuko's Gauss-Legendre rule is exact
    for it). The inverse is solved on the whole line to the float64 resolution (zuko bisects on
    ``[-B, B]`` only, to about 1e-6); its gradients are the implicit function's.

    Args:
        inputs: ``(...)`` values to transform.
        a: ``(..., K, L + 1)`` coefficients of ``K`` polynomials of degree ``L <= 31``; leading
            dims equal to ``inputs.shape`` or broadcastable to it.
        inverse: evaluate the inverse map instead.
        bound: the scale ``B`` of the polynomials' argument ``u / B`` (zuko's 10).
        slope: the minimum slope, ``> 0``.
        backend: ``None`` (fastest available), ``"reference"`` or ``"numba"``.

    Returns:
        ``(outputs, logabsdet)``, both of ``inputs.shape`` and dtype. A NaN input gives NaN in
        both at that element only; an empty input gives empty outputs.
    """
    inputs, a = autocast_args(inputs, a)  # float32 under autocast
    bound, slope = _SOS_MEMO.check(_sos_check_all, (inputs, a), (bound, slope))
    name = resolve_backend(SOS, inputs, backend, caller=SOS)
    inverse = check_bool(SOS, "inverse", inverse)
    if a.shape[:-2] != inputs.shape:  # broadcast: a view; autograd sums the gradient back
        a = a.expand(*inputs.shape, *a.shape[-2:])
    return _sos_op(inputs, a, inverse, bound, slope, name)
