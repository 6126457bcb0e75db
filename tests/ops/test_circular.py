"""The circular spline (``fastflow.ops.rq_spline_circular``) against zuko's own
``CircularRQSTransform`` on every backend with zuko's spline prologue: float64 to 1e-10 (outputs,
log-dets, every gradient, the inverse), float32 no worse than zuko's own float32; and what makes
it a map of the circle: periodic in its input, continuous in value and slope across the seam.
The conformance suite runs the rest (derivative modes, compile, shapes, bad inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.backends import BACKENDS as REGISTRY
from fastflow.ops import rq_spline_circular
from tests._backends import backend_name, backends_for, device_for

spline = pytest.importorskip("zuko.flows.spline")

BACKENDS = [b for b in backends_for("rq_spline") if "zuko" in REGISTRY[backend_name(b)].parameterizations]


def _inputs(k=8, n=401, seed=0, dtype=torch.float64, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    w, h = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale for _ in range(2))
    d = torch.randn(n, k - 1, generator=g, dtype=torch.float64) * scale
    return [t.to(dtype) for t in (x, w, h, d)]


def _zuko(x, w, h, d, slope=1e-3):
    t = spline.CircularRQSTransform(w, h, d, slope=slope)
    y, lad = t.call_and_ladj(x)
    return t, y, lad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 8, 33])
def test_forward_inverse_and_gradients_equal_zukos_in_float64(backend, k):
    b = backend_name(backend)
    dev = device_for(b)
    x, w, h, d = _inputs(k)
    ref = [t.clone().requires_grad_() for t in (x, w, h, d)]
    t, want_y, want_lad = _zuko(*ref)
    ours = [t_.to(dev).requires_grad_() for t_ in (x, w, h, d)]
    y, lad = rq_spline_circular(*ours, backend=b)
    torch.testing.assert_close(y.detach().cpu(), want_y.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(lad.detach().cpu(), want_lad.detach(), rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(3)
    gy, gl = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((want_y, want_lad), ref, (gy, gl))
    got = torch.autograd.grad((y, lad), ours, (gy.to(dev), gl.to(dev)))
    for name, a, e in zip(("x", "widths", "heights", "derivatives"), got, want):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    # the inverse: zuko's, and back to x
    xi, lad_i = rq_spline_circular(want_y.detach().to(dev), w.to(dev), h.to(dev), d.to(dev), inverse=True, backend=b)
    torch.testing.assert_close(xi.cpu(), t.inv(want_y.detach()), rtol=0, atol=1e-10)
    torch.testing.assert_close(xi.cpu(), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(lad_i.cpu(), -want_lad.detach(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_no_worse_than_zukos_float32(backend):
    b = backend_name(backend)
    x, w, h, d = _inputs(8, n=4001, scale=2.0)
    _, y64, lad64 = _zuko(x, w, h, d)
    f32 = [t.float() for t in (x, w, h, d)]
    _, yz, ladz = _zuko(*f32)
    y, lad = rq_spline_circular(*(t.to(device_for(b)) for t in f32), backend=b)
    for ours, theirs, want in ((y.cpu(), yz, y64), (lad.cpu(), ladz, lad64)):
        err = (ours.double() - want).abs()
        zerr = (theirs.double() - want).abs()
        assert float(err.max()) <= 1.5 * float(zerr.max()) + 1e-6
        assert float(err.mean()) <= 1.5 * float(zerr.mean()) + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_map_of_the_circle(backend):
    """Periodic in x; at the seam (x = 0, where the rotation wraps) the two one-sided values meet
    modulo 2 pi with equal slopes, so the map is a diffeomorphism of the circle."""
    b = backend_name(backend)
    _, w, h, d = _inputs(6, n=64)
    x, _, _, _ = _inputs(6, n=64, seed=1)
    y, lad = rq_spline_circular(x, w, h, d, backend=b)
    for turns in (-3, 1, 7):
        y2, lad2 = rq_spline_circular(x + 2 * math.pi * turns, w, h, d, backend=b)
        torch.testing.assert_close(y2, y, rtol=0, atol=1e-11 * (1 + abs(turns)))
        torch.testing.assert_close(lad2, lad, rtol=0, atol=1e-8 * (1 + abs(turns)))
    eps = 1e-10
    below, lad_below = rq_spline_circular(torch.full((64,), -eps, dtype=torch.float64), w, h, d, backend=b)
    above, lad_above = rq_spline_circular(torch.full((64,), eps, dtype=torch.float64), w, h, d, backend=b)
    torch.testing.assert_close(below - 2 * math.pi, above, rtol=0, atol=1e-8)  # y(0-) = pi, y(0+) = -pi
    torch.testing.assert_close(lad_below, lad_above, rtol=0, atol=1e-7)  # both boundary slopes are 1
    assert float(lad_below.abs().max()) < 1e-7
    # the image of the circle is the circle: forward outputs and inverse outputs in [-pi, pi]
    xs = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    ys, _ = rq_spline_circular(xs, w[:1], h[:1], d[:1], backend=b)
    assert float(ys.abs().max()) <= math.pi
    back, _ = rq_spline_circular(ys, w[:1], h[:1], d[:1], inverse=True, backend=b)
    assert float(back.min()) >= -math.pi and float(back.max()) < math.pi
    torch.testing.assert_close(back, torch.remainder(xs + math.pi, 2 * math.pi) - math.pi, rtol=0, atol=1e-9)


def test_errors_name_the_circular_spline():
    x, w, h, d = _inputs(4, n=5)
    with pytest.raises(ValueError, match="rq_spline_circular: derivatives must have K-1=3"):
        rq_spline_circular(x, w, h, w)
    with pytest.raises(ValueError, match="rq_spline_circular: slope must be in"):
        rq_spline_circular(x, w, h, d, slope=1.5)
    with pytest.raises(TypeError, match="rq_spline_circular: inverse"):
        rq_spline_circular(x, w, h, d, inverse="yes")
