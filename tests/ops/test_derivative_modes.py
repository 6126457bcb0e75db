"""Double backward at every size, an op without a composite, and compile with dynamic shapes.

Every functorch transform, forward mode and batched gradients of every op on every backend are
checked by the conformance suite (``test_every_derivative_mode_matches_the_composite``,
``test_vmap_of_every_transform``); this file keeps what is about sizes and routes.

- Double backward (``create_graph=True``) at every size (the small-batch torch route and the
  kernels) and on every backend, against autograd through the reference maths.
- An op registered without a composite raises ``HigherOrderError`` naming itself in every
  derivative mode it cannot serve, never zeros.
- ``torch.compile(fullgraph=True, dynamic=True)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fastflow.kernels.reference.coupling import affine_coupling_reference, rescale_reference
from fastflow.kernels.reference.spline import rq_spline_reference
from fastflow.ops import (HigherOrderError, additive_coupling, affine_coupling, lu_conv1x1,
                          rescale, rq_spline)
from fastflow.ops.coupling import SMALL_CPU_ELEMS
from fastflow.backends import BACKENDS
from tests._backends import device_for

SCALES = ["exp", "softclamp", "sigmoid"]


def _dtype(backend):
    """float64 where the backend takes it for every op (its declared dtypes), else float32."""
    return torch.float64 if torch.float64 in BACKENDS[backend].dtypes else torch.float32


def _tol(backend):
    return dict(rtol=2e-4, atol=2e-4) if _dtype(backend) == torch.float32 else dict(rtol=1e-9, atol=1e-10)


def _spline_case(backend, shape=(5, 3), k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = device_for(backend), _dtype(backend)
    x = (2.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dev, dt)
    uw, uh = (torch.randn(*shape, k, generator=g, dtype=torch.float64).to(dev, dt) for _ in range(2))
    ud = torch.randn(*shape, k - 1, generator=g, dtype=torch.float64).to(dev, dt)
    return x, uw, uh, ud


def _spline_ref(inverse):
    def f(x, uw, uh, ud):
        return rq_spline_reference(x, uw, uh, ud, inverse, 2.0, 1e-3, 1e-3, 1e-3)
    return f


def _spline_op(backend, inverse):
    def f(x, uw, uh, ud):
        return rq_spline(x, uw, uh, ud, inverse=inverse, tail_bound=2.0, backend=backend)
    return f


def _affine_case(backend, b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = device_for(backend), _dtype(backend)
    return tuple(torch.randn(b, d, generator=g, dtype=torch.float64).to(dev, dt) for _ in range(3))


def _lu_args(c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return (torch.randperm(c, generator=g), 0.3 * torch.randn(c, c, generator=g, dtype=d),
            0.3 * torch.randn(c, c, generator=g, dtype=d), 0.2 * torch.randn(c, generator=g, dtype=d),
            torch.ones(c, dtype=d))


def _second_derivative(f, x, *rest):
    """d/dx sum(d/dx (sum y^2 + sum lad)), through create_graph."""
    x = x.clone().requires_grad_()
    y, lad = f(x, *rest)
    (g,) = torch.autograd.grad((y ** 2).sum() + lad.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("backend", [None, "reference", "numba"])
@pytest.mark.parametrize("n", [4000, 160000])  # the small-batch torch route and the kernels
def test_affine_double_backward_every_size(backend, n):
    x, t, h = _affine_case("numba", n // 40, 40)
    for scale in SCALES:
        g, hh = _second_derivative(lambda x, t, h: affine_coupling(x, t, h, scale=scale, backend=backend), x, t, h)
        g0, h0 = _second_derivative(lambda x, t, h: affine_coupling_reference(x, t, h, scale, 2.0, False), x, t, h)
        torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hh, h0, rtol=1e-10, atol=1e-10)
        assert h0.abs().max() > 0


def test_rescale_additive_lu_double_backward():
    x, t, _ = _affine_case("numba", 300, 600)
    ls = torch.randn(600, dtype=torch.float64)
    for backend in ("reference", "numba"):
        g, hh = _second_derivative(lambda x, ls: rescale(x, ls, backend=backend), x, ls)
        g0, h0 = _second_derivative(lambda x, ls: rescale_reference(x, ls, False), x, ls)
        torch.testing.assert_close(hh, h0)
        g, hh = _second_derivative(lambda x, t: additive_coupling(x, t, backend=backend), x, t)
        torch.testing.assert_close(hh, torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x) * 2)
    perm, lower, upper, log_s, sign = _lu_args(c=4)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    lower = lower.clone().requires_grad_()
    y, lad = lu_conv1x1(x, perm, lower, upper, log_s, sign, backend="reference")
    (gl,) = torch.autograd.grad((y ** 2).sum(), lower, create_graph=True)
    (hl,) = torch.autograd.grad(gl.sum(), lower)
    # the map is linear in x and the weight is bilinear in L, M: compare with the dense weight
    from fastflow.kernels.reference.lu import weight

    lower2 = lower.detach().clone().requires_grad_()
    w = weight(perm, lower2, upper, log_s, sign)
    y2 = torch.einsum("oc,bchw->bohw", w, x)
    (gl2,) = torch.autograd.grad((y2 ** 2).sum(), lower2, create_graph=True)
    (hl2,) = torch.autograd.grad(gl2.sum(), lower2)
    torch.testing.assert_close(gl, gl2)
    torch.testing.assert_close(hl, hl2)


@pytest.mark.parametrize("op", ["rq_spline", "affine_coupling"])
def test_compile_fullgraph_dynamic(op):
    torch._dynamo.reset()
    if op == "rq_spline":
        def f(x, w, h, d):
            return rq_spline(x, w, h, d, tail_bound=2.5)

        cases = [_spline_case("numba", shape=(n, 3), seed=n) for n in (5, 9)]
    else:
        def f(x, t, h):
            return affine_coupling(x, t, h, scale="softclamp", clamp=1.5)

        cases = [_affine_case("numba", n, 8, seed=n) for n in (300, 17)]
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for args in cases:
        for got, want in zip(compiled(*args), f(*args)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_small_route_constant_matches():
    assert SMALL_CPU_ELEMS < 160000  # the sizes above straddle the torch route's threshold


def test_an_op_without_a_composite_raises_in_every_higher_mode():
    from fastflow.ops._dispatch import custom_op

    @custom_op("fastflow_test::square_no_composite")
    def square(x: torch.Tensor) -> torch.Tensor:
        return x * x

    square.register_fake(lambda x: torch.empty_like(x))
    square.register_autograd(lambda ctx, g: g * 2 * ctx.saved_tensors[0],
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))
    x = torch.randn(4, dtype=torch.float64)
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd):
        with pytest.raises(HigherOrderError, match="square_no_composite: functorch"):
            transform(lambda v: square(v).sum())(x)
    with pytest.raises(HigherOrderError, match="square_no_composite: functorch"):
        with fwAD.dual_level():
            square(fwAD.make_dual(x, torch.ones_like(x)))
    xx = x.clone().requires_grad_()
    y = square(xx)
    with pytest.raises(HigherOrderError, match="square_no_composite: double backward"):
        torch.autograd.grad(y.sum(), xx, create_graph=True)
    with pytest.raises(HigherOrderError, match="square_no_composite: batched gradients"):
        torch.autograd.grad(y, xx, torch.eye(4, dtype=x.dtype), is_grads_batched=True)
    (g,) = torch.autograd.grad(square(xx).sum(), xx)  # first order: the registered backward
    torch.testing.assert_close(g, 2 * x)
