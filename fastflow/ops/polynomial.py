"""``fastflow.ops.polynomial``: monotone polynomial laws, elementwise.

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
from fastflow.kernels.reference.bernstein import MAX_PARAMS, evaluate
from fastflow.ops._autocast import autocast_args
from fastflow.ops._checks import CheckMemo, check_bool, check_elementwise, check_positive_float, describe
from fastflow.ops._opdef import define

__all__ = ["bernstein", "MAX_PARAMS"]

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
    if torch.compiler.is_compiling():
        bound = _check_all(inputs, theta, bound)
    else:
        key = _MEMO.key((inputs, theta), (bound,))
        done = _MEMO.get(key)
        bound = done if done is not None else _MEMO.put(key, _check_all(inputs, theta, bound))
    name = resolve_backend(OP, inputs, backend, caller=OP)
    inverse = check_bool(OP, "inverse", inverse)
    if theta.shape[:-1] != inputs.shape:  # broadcast: a view; autograd sums the gradient back
        theta = theta.expand(*inputs.shape, theta.shape[-1])
    return _bernstein_op(inputs, theta, inverse, bound, name)
