"""Derivative modes beyond first-order reverse mode, and compile with dynamic shapes, for every op.

- Forward mode (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``) of the elementwise
  ops (spline, couplings, rescale) on every backend, against ``jacrev``/``jvp`` of the pure-torch
  reference maths; ops without forward mode (the LU maps) raise an error naming the op, never
  zero tangents.
- Double backward (``create_graph=True``) at every size (the small-batch torch route and the
  kernels) and on every backend, against autograd through the reference maths.
- functorch reverse transforms (``grad``, ``vmap``) over the ops.
- ``torch.compile(fullgraph=True, dynamic=True)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fastflow.kernels.reference.coupling import affine_coupling_reference, rescale_reference
from fastflow.kernels.reference.spline import rq_spline_reference
from fastflow.ops import (HigherOrderError, actnorm_conv1x1, additive_coupling, affine_coupling, lu_conv1x1,
                          lu_linear, rescale, rq_spline)
from fastflow.ops.coupling import SMALL_CPU_ELEMS
from tests._backends import ALL_BACKENDS, device_for

SCALES = ["exp", "softclamp", "sigmoid"]


def _dtype(backend):
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def _tol(backend):
    return dict(rtol=2e-4, atol=2e-4) if backend in ("triton", "cuda") else dict(rtol=1e-9, atol=1e-10)


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_jacfwd_matches_jacrev_of_reference(backend, inverse):
    args = _spline_case(backend)
    got = torch.func.jacfwd(_spline_op(backend, inverse), argnums=(0, 1, 2, 3))(*args)
    want = torch.func.jacrev(_spline_ref(inverse), argnums=(0, 1, 2, 3))(*(a.double().cpu() for a in args))
    for g_out, w_out in zip(got, want):  # (outputs, logabsdet) x (x, widths, heights, derivatives)
        for g, w in zip(g_out, w_out):
            assert g.abs().max() > 0 or w.abs().max() == 0
            torch.testing.assert_close(g.double().cpu(), w, **_tol(backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_spline_forward_ad_dual_tensors(backend):
    args = _spline_case(backend, shape=(7, 4), k=5, seed=1)
    tangents = [torch.randn_like(a) for a in args]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        out = _spline_op(backend, False)(*duals)
        got = [fwAD.unpack_dual(o).tangent for o in out]
    _, want = torch.func.jvp(_spline_ref(False), tuple(a.double().cpu() for a in args),
                             tuple(t.double().cpu() for t in tangents))
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g.double().cpu(), w, **_tol(backend))


def _affine_case(backend, b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = device_for(backend), _dtype(backend)
    return tuple(torch.randn(b, d, generator=g, dtype=torch.float64).to(dev, dt) for _ in range(3))


@pytest.mark.parametrize("backend", [None, *ALL_BACKENDS])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_jvp_matches_reference(backend, scale, inverse):
    # 40 x 8 takes the small-batch torch route with backend=None; 1200 x 160 (> SMALL_CPU_ELEMS) the kernel
    for b, d in ((40, 8), (1200, 160)):
        if backend in ("triton", "cuda") and b > 40:
            continue  # the interpreter is slow; the law is the same at every size
        args = _affine_case(backend or "numba", b, d)
        tangents = tuple(torch.randn_like(a) for a in args)
        _, got = torch.func.jvp(lambda *a: affine_coupling(*a, scale=scale, inverse=inverse, backend=backend),
                                args, tangents)
        _, want = torch.func.jvp(lambda *a: affine_coupling_reference(*a, scale, 2.0, inverse),
                                 tuple(a.double().cpu() for a in args), tuple(t.double().cpu() for t in tangents))
        for g, w in zip(got, want):
            assert w.abs().max() > 0
            torch.testing.assert_close(g.double().cpu(), w, **_tol(backend or "numba"))


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_affine_jacfwd_and_forward_ad(backend):
    x, t, h = _affine_case(backend, 3, 4)
    f = lambda x, t, h: affine_coupling(x, t, h, scale="softclamp", backend=backend)  # noqa: E731
    r = lambda x, t, h: affine_coupling_reference(x, t, h, "softclamp", 2.0, False)  # noqa: E731
    got = torch.func.jacfwd(f, argnums=(0, 1, 2))(x, t, h)
    want = torch.func.jacrev(r, argnums=(0, 1, 2))(x, t, h)
    for go, wo in zip(got, want):
        for g, w in zip(go, wo):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        y, lad = f(fwAD.make_dual(x, tx), t, h)
        ty = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(ty, torch.func.jvp(lambda x: r(x, t, h)[0], (x,), (tx,))[1])


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("inverse", [False, True])
def test_additive_and_rescale_jvp(backend, inverse):
    x, t, _ = _affine_case(backend, 300, 600)  # 180k elements: past every small-size route
    ls = torch.randn(600, dtype=torch.float64)
    tx, tt, tl = torch.randn_like(x), torch.randn_like(t), torch.randn_like(ls)
    _, got = torch.func.jvp(lambda x, t: additive_coupling(x, t, inverse=inverse, backend=backend), (x, t), (tx, tt))
    torch.testing.assert_close(got[0], tx - tt if inverse else tx + tt)
    assert torch.equal(got[1], torch.zeros(300, dtype=torch.float64))
    _, got = torch.func.jvp(lambda x, ls: rescale(x, ls, inverse=inverse, backend=backend), (x, ls), (tx, tl))
    _, want = torch.func.jvp(lambda x, ls: rescale_reference(x, ls, inverse), (x, ls), (tx, tl))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _lu_args(c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return (torch.randperm(c, generator=g), 0.3 * torch.randn(c, c, generator=g, dtype=d),
            0.3 * torch.randn(c, c, generator=g, dtype=d), 0.2 * torch.randn(c, generator=g, dtype=d),
            torch.ones(c, dtype=d))


@pytest.mark.parametrize("name", ["lu_linear", "lu_conv1x1", "actnorm_conv1x1"])
def test_lu_forward_mode_is_a_clear_error(name):
    perm, lower, upper, log_s, sign = _lu_args()
    c = 3
    x = torch.randn(2, c, 2, 2, dtype=torch.float64) if name != "lu_linear" else torch.randn(2, c, dtype=torch.float64)
    if name == "actnorm_conv1x1":
        fn = lambda x: actnorm_conv1x1(x, torch.zeros(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype),  # noqa: E731
                                       perm, lower, upper, log_s, sign)[0]
    else:
        fn = lambda x: {"lu_linear": lu_linear, "lu_conv1x1": lu_conv1x1}[name](  # noqa: E731
            x, perm, lower, upper, log_s, sign)[0]
    with pytest.raises(HigherOrderError, match=f"fastflow.ops.{name}: forward-mode AD"):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with pytest.raises(HigherOrderError, match=f"fastflow.ops.{name}"):
        with fwAD.dual_level():
            fn(fwAD.make_dual(x, torch.ones_like(x)))
    # reverse mode through functorch still works
    g = torch.func.grad(lambda x: fn(x).sum())(x)
    xx = x.clone().requires_grad_()
    fn(xx).sum().backward()
    torch.testing.assert_close(g, xx.grad)


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_spline_double_backward(backend):
    x, uw, uh, ud = _spline_case(backend, shape=(50, 4))
    g, hh = _second_derivative(_spline_op(backend, False), x, uw, uh, ud)
    g0, h0 = _second_derivative(_spline_ref(False), *(a.double().cpu() for a in (x, uw, uh, ud)))
    torch.testing.assert_close(g.double().cpu(), g0, **_tol(backend))
    torch.testing.assert_close(hh.double().cpu(), h0, rtol=1e-3 if backend in ("triton", "cuda") else 1e-9,
                               atol=1e-3 if backend in ("triton", "cuda") else 1e-9)


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


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_functorch_grad_and_vmap(backend):
    x, uw, uh, ud = _spline_case(backend, shape=(6, 3))
    f = _spline_op(backend, False)
    g = torch.func.grad(lambda x: f(x, uw, uh, ud)[1].sum())(x)
    xx = x.clone().requires_grad_()
    f(xx, uw, uh, ud)[1].sum().backward()
    torch.testing.assert_close(g, xx.grad)
    got = torch.func.vmap(lambda a, b, c, d: f(a, b, c, d)[0])(x, uw, uh, ud)
    torch.testing.assert_close(got, f(x, uw, uh, ud)[0])
    a, t, h = _affine_case(backend, 4, 5)
    got = torch.func.vmap(lambda a, t, h: affine_coupling(a[None], t[None], h[None], backend=backend)[1])(a, t, h)
    torch.testing.assert_close(got[:, 0], affine_coupling(a, t, h, backend=backend)[1])


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
