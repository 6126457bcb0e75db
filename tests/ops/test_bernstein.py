"""The Bernstein law's op (``fastflow.ops.bernstein``) against zuko's own
``BoundedBernsteinTransform`` on every backend that has it: float64 to 1e-10 (forward, inverse,
log-dets and every gradient), float32 no worse than zuko's own float32; the inverse to the
float64 resolution with the implicit function's gradients; broadcasting, high degrees and the
backends it has no kernels on. The conformance suite (``tests/ops/test_conformance.py``) runs the
rest (derivative modes, compile, odd and empty shapes, bad inputs)."""

from __future__ import annotations

import pytest
import torch

from fastflow import BackendUnavailableError
from fastflow.ops import bernstein
from tests._backends import backend_name, backends_for, device_for

zt = pytest.importorskip("zuko.transforms")

BACKENDS = backends_for("bernstein")
BOUND = 5.0


def _inputs(n, shape=(301,), seed=0, spread=6.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * spread  # inside and outside [-B, B]
    theta = torch.randn(*shape, n, generator=g, dtype=torch.float64) * 1.5
    return x.to(dtype), theta.to(dtype)


def _zuko(x, theta):
    t = zt.BoundedBernsteinTransform(theta, bound=BOUND)
    y = t(x)
    return t, y, t.log_abs_det_jacobian(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 5, 17])
def test_forward_and_gradients_equal_zukos_in_float64(backend, n):
    b = backend_name(backend)
    x, theta = _inputs(n)
    xz, tz = x.clone().requires_grad_(), theta.clone().requires_grad_()
    _, want_y, want_lad = _zuko(xz, tz)
    dev = device_for(b)
    xo, to = x.to(dev).requires_grad_(), theta.to(dev).requires_grad_()
    y, lad = bernstein(xo, to, bound=BOUND, backend=b)
    torch.testing.assert_close(y.cpu(), want_y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad.cpu(), want_lad.detach(), rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(3)
    gy, gl = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((want_y, want_lad), (xz, tz), (gy, gl))
    got = torch.autograd.grad((y, lad), (xo, to), (gy.to(dev), gl.to(dev)))
    for a, w in zip(got, want):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_is_zukos_to_its_tolerance_and_exact_here(backend):
    b = backend_name(backend)
    x, theta = _inputs(9, seed=1)
    t, y, lad = _zuko(x, theta)
    dev = device_for(b)
    x_back, lad_inv = bernstein(y.to(dev), theta.to(dev), inverse=True, bound=BOUND, backend=b)
    # zuko bisects to about its eps; ours is solved to the float64 resolution
    torch.testing.assert_close(x_back.cpu(), t.inv(y), rtol=0, atol=1e-5)
    torch.testing.assert_close(x_back.cpu(), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(lad_inv.cpu(), -lad, rtol=0, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_gradients_are_the_implicit_functions(backend):
    # d x / d theta of the inverse = -(d y / d theta) / (d y / d x) at the root, from zuko's forward
    b = backend_name(backend)
    x, theta = _inputs(6, shape=(40,), seed=2, spread=4.5)
    tz = theta.clone().requires_grad_()
    xz = x.clone().requires_grad_()
    _, y, lad = _zuko(xz, tz)
    dydx, dydt = torch.autograd.grad(y.sum(), (xz, tz), retain_graph=True)
    yo, to = y.detach().requires_grad_(), theta.clone().requires_grad_()
    x_back, _ = bernstein(yo, to, inverse=True, bound=BOUND, backend=b)
    g_y, g_t = torch.autograd.grad(x_back.sum(), (yo, to))
    torch.testing.assert_close(g_y, 1 / dydx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_t, -dydt / dydx[:, None], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_no_worse_than_zukos_float32(backend):
    b = backend_name(backend)
    x, theta = _inputs(17, shape=(4096,), seed=4)
    _, want_y, want_lad = _zuko(x, theta)
    _, z32_y, z32_lad = _zuko(x.float(), theta.float())
    dev = device_for(b)
    y, lad = bernstein(x.float().to(dev), theta.float().to(dev), bound=BOUND, backend=b)
    for ours, theirs, want in ((y, z32_y, want_y), (lad, z32_lad, want_lad)):
        err_ours = (ours.cpu().double() - want).abs().max()
        err_theirs = (theirs.double() - want).abs().max()
        assert err_ours <= err_theirs * 1.01 + 1e-7, (float(err_ours), float(err_theirs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_parameters_and_a_high_degree(backend):
    b = backend_name(backend)
    dev = device_for(b)
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(6, 50, generator=g, dtype=torch.float64) * 2 - 1) * 4.0
    theta = torch.randn(50, 300, generator=g, dtype=torch.float64)  # one row per feature, degree 304
    xo, to = x.to(dev), theta.to(dev).requires_grad_()
    y, lad = bernstein(xo, to, bound=BOUND, backend=b)
    _, want_y, want_lad = _zuko(x, theta.expand(6, 50, 300))
    torch.testing.assert_close(y.cpu(), want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad.cpu(), want_lad, rtol=1e-10, atol=1e-9)
    (grad,) = torch.autograd.grad(lad.sum(), to)
    assert grad.shape == theta.shape and bool(torch.isfinite(grad).all())
    x_back, _ = bernstein(y, to.detach(), inverse=True, bound=BOUND, backend=b)
    torch.testing.assert_close(x_back.cpu(), x, rtol=0, atol=1e-11)


def test_a_zero_parameter_layer_is_the_identity():
    # equal steps: the polynomial of evenly spaced coefficients is linear (what a fresh layer gives)
    x = torch.linspace(-4.9, 4.9, 99, dtype=torch.float64)
    y, lad = bernstein(x, torch.zeros(99, 17, dtype=torch.float64), bound=BOUND)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(lad, torch.zeros_like(x), rtol=0, atol=1e-12)


def test_a_backend_without_its_kernels_refuses():
    x, theta = _inputs(3, shape=(4,))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        bernstein(x, theta, backend="cuda")
