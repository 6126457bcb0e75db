"""Test helpers: tolerances per dtype (the one place they live) and the naive log-det oracle."""

from __future__ import annotations

from typing import Callable

import torch

# (rtol, atol) for comparing a backend against an oracle of the same dtype, or a low-precision
# result against an upcast reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


# float32 storage computed in float32 arithmetic (the GPU kernels) against a float64 oracle:
# round-off of ~1e-7 magnified by the log-det's and gradients' sensitivity to the knots.
FLOAT32_COMPUTE_TOLERANCE = (1e-3, 1e-4)


def tolerances(dtype: torch.dtype, computed_in_float32: bool = False) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    if computed_in_float32 and dtype == torch.float32:
        rtol, atol = FLOAT32_COMPUTE_TOLERANCE
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """``torch.testing.assert_close`` with the tolerances of ``dtype`` (default: actual's)."""
    tol = tolerances(dtype or actual.dtype)
    tol.update(kw)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


def outputs_and_grads(fn: Callable, tensors, grad_outputs: torch.Tensor, grad_logabsdet: torch.Tensor, **kw):
    """Run ``out, lad = fn(*tensors, **kw)`` on fresh leaves and backpropagate the given output
    gradients: returns ``(out, lad, grads)``, grads one per tensor (the VJP under test)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out, lad = fn(*leaves, **kw)
    grads = torch.autograd.grad((out, lad), leaves, (grad_outputs.to(out.dtype), grad_logabsdet.to(out.dtype)))
    return out.detach(), lad.detach(), grads


def jacobian_logabsdet(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The naive O(D^3) oracle: slogdet of the autograd Jacobian of ``fn`` per sample.

    Args:
        fn: maps a batch ``(B, *event)`` to ``(B, *event)`` with samples independent.
        x: ``(B, *event)``.

    Returns:
        ``(B,)`` ``log|det d fn(x)_b / d x_b|``.
    """
    b = x.shape[0]
    d = x[0].numel()
    out = []
    for i in range(b):
        xi = x[i : i + 1].detach()

        def single(v, i=i):
            return fn(v.reshape(1, *x.shape[1:])).reshape(-1)

        jac = torch.autograd.functional.jacobian(single, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac.reshape(d, d))[1])
    return torch.stack(out)


def elementwise_jacobian_logabsdet(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Oracle for elementwise maps: slogdet of the full Jacobian over a flat ``x`` equals the
    sum of the per-element log-slopes; returned as that sum (a scalar)."""
    flat = x.detach().reshape(-1)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(-1), flat)
    return torch.linalg.slogdet(jac)[1]


def assert_close_conditioned(actual: torch.Tensor, expected: torch.Tensor, amplification: torch.Tensor,
                             dtype: torch.dtype | None = None, what: str = "values",
                             computed_in_float32: bool = False) -> None:
    """Compare where the map is ill-conditioned: the error allowed at each element grows with the
    factor ``amplification`` (e.g. ``|dy/dx|``) by which a rounding of the input is magnified.

    Kernels computing in float32 are held to float32 round-off times the conditioning.
    """
    rtol, atol = tolerances(dtype or actual.dtype, computed_in_float32).values()
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs() / (1.0 + amplification.double().cpu())
    ok = (err <= atol + rtol * e.abs()) | (torch.isnan(a) & torch.isnan(e))
    assert bool(ok.all()), f"{what}: max conditioned error {float(err.max()):.3g} (rtol={rtol}, atol={atol})"
