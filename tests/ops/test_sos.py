"""The sum-of-squares polynomial law's op (``fastflow.ops.sos_polynomial``) against zuko's own
``SOSPolynomialTransform`` on every backend that has it: float64 to 1e-10 relative (outputs,
log-dets and every gradient), float32 no worse than zuko's own float32; the inverse solved on the
whole line with the implicit function's gradients. The conformance suite runs the rest."""

from __future__ import annotations

import pytest
import torch

from fastflow.ops import sos_polynomial
from tests._backends import backend_name, backends_for, device_for

zt = pytest.importorskip("zuko.transforms")

BACKENDS = backends_for("sos_polynomial")


def _inputs(k, degree, shape=(301,), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 6.0  # inside and beyond zuko's bound 10
    a = torch.randn(*shape, k, degree + 1, generator=g, dtype=torch.float64) * 0.7
    return x.to(dtype), a.to(dtype)


def _zuko(x, a):
    t = zt.SOSPolynomialTransform(a, slope=1e-3)
    y, lad = t.call_and_ladj(x)
    return t, y, lad


def _close(got, want, rtol):
    # relative to the larger of |want| and 1 (the polynomials reach |y| ~ 1e3 here)
    err = ((got - want).abs() / want.abs().clamp_min(1.0)).max()
    assert float(err) <= rtol, float(err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,degree", [(3, 4), (1, 0), (2, 7)])
def test_forward_and_gradients_equal_zukos_in_float64(backend, k, degree):
    b = backend_name(backend)
    x, a = _inputs(k, degree)
    xz, az = x.clone().requires_grad_(), a.clone().requires_grad_()
    _, want_y, want_lad = _zuko(xz, az)
    dev = device_for(b)
    xo, ao = x.to(dev).requires_grad_(), a.to(dev).requires_grad_()
    y, lad = sos_polynomial(xo, ao, backend=b)
    _close(y.detach().cpu(), want_y.detach(), 1e-10)
    _close(lad.detach().cpu(), want_lad.detach(), 1e-10)
    g = torch.Generator().manual_seed(3)
    gy, gl = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((want_y, want_lad), (xz, az), (gy, gl))
    got = torch.autograd.grad((y, lad), (xo, ao), (gy.to(dev), gl.to(dev)))
    for ours, theirs in zip(got, want):
        _close(ours.cpu(), theirs, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_on_the_whole_line(backend):
    # zuko bisects on [-10, 10] only (to ~1e-6): equal to it there; beyond, ours still inverts
    b = backend_name(backend)
    x, a = _inputs(3, 4, seed=1)
    t, y, lad = _zuko(x, a)
    dev = device_for(b)
    x_back, lad_inv = sos_polynomial(y.to(dev), a.to(dev), inverse=True, backend=b)
    inside = x.abs() < 9.9
    torch.testing.assert_close(x_back.cpu()[inside], t.inv(y)[inside], rtol=0, atol=2e-5)
    torch.testing.assert_close(x_back.cpu(), x, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(lad_inv.cpu(), -lad, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_gradients_are_the_implicit_functions(backend):
    b = backend_name(backend)
    x, a = _inputs(2, 3, shape=(40,), seed=2)
    xz, az = x.clone().requires_grad_(), a.clone().requires_grad_()
    _, y, _ = _zuko(xz, az)
    dydx, dyda = torch.autograd.grad(y.sum(), (xz, az))
    yo, ao = y.detach().requires_grad_(), a.clone().requires_grad_()
    x_back, _ = sos_polynomial(yo, ao, inverse=True, backend=b)
    g_y, g_a = torch.autograd.grad(x_back.sum(), (yo, ao))
    torch.testing.assert_close(g_y, 1 / dydx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_a, -dyda / dydx[:, None, None], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_no_worse_than_zukos_float32(backend):
    b = backend_name(backend)
    x, a = _inputs(3, 4, shape=(4096,), seed=4)
    _, want_y, want_lad = _zuko(x, a)
    _, z32_y, z32_lad = _zuko(x.float(), a.float())
    dev = device_for(b)
    y, lad = sos_polynomial(x.float().to(dev), a.float().to(dev), backend=b)
    for ours, theirs, want in ((y, z32_y, want_y), (lad, z32_lad, want_lad)):
        scale = want.abs().clamp_min(1.0)
        err_ours = ((ours.detach().cpu().double() - want).abs() / scale).max()
        err_theirs = ((theirs.detach().double() - want).abs() / scale).max()
        assert err_ours <= err_theirs * 1.01 + 1e-7, (float(err_ours), float(err_theirs))


def test_broadcast_coefficients_and_a_zero_layer():
    x = torch.linspace(-30, 30, 61, dtype=torch.float64)
    y, lad = sos_polynomial(x, torch.zeros(3, 5, dtype=torch.float64).expand(61, 3, 5))
    torch.testing.assert_close(y, 1.001 * x, rtol=1e-14, atol=1e-13)  # p_k = 1: g = 1 + slope
    a = torch.randn(7, 1, 2, 3, dtype=torch.float64, requires_grad=True)  # broadcast over a batch of 5
    xs = torch.randn(5, 7, dtype=torch.float64)
    out, _ = sos_polynomial(xs, a[:, 0].unsqueeze(0).expand(5, 7, 2, 3))
    out2, _ = sos_polynomial(xs, a[:, 0])
    torch.testing.assert_close(out, out2)
    (grad,) = torch.autograd.grad(out2.sum(), a)
    assert grad.shape == a.shape
