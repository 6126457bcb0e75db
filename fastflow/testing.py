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


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """``torch.testing.assert_close`` with the tolerances of ``dtype`` (default: actual's)."""
    tol = tolerances(dtype or actual.dtype)
    tol.update(kw)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


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
