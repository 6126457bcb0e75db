"""The Bernstein law's oracle (``fastflow/kernels/reference/bernstein.py``) against zuko's own
``BoundedBernsteinTransform`` in float64, and against the maths itself (autograd's derivative,
round trips): the test the fused kernels of issue 29 will be held to."""

from __future__ import annotations

import pytest
import torch

from fastflow.kernels.reference.bernstein import bernstein, bernstein_inverse, constrain

zt = pytest.importorskip("zuko.transforms")

BOUND = 5.0


def _inputs(n_raw, shape=(257,), seed=0, spread=7.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * spread  # inside and outside [-B, B]
    raw = torch.randn(*shape, n_raw, generator=g, dtype=torch.float64) * 1.5
    return x, raw


@pytest.mark.parametrize("n_raw", [1, 3, 17])
def test_equals_zuko_in_float64(n_raw):
    x, raw = _inputs(n_raw)
    t = zt.BoundedBernsteinTransform(raw, bound=BOUND)
    want_y = t(x)
    want_lad = t.log_abs_det_jacobian(x, want_y)
    y, lad = bernstein(x, raw, BOUND)
    torch.testing.assert_close(constrain(raw, BOUND), t.theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, want_lad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_raw", [2, 9])
def test_log_det_is_the_derivative(n_raw):
    x, raw = _inputs(n_raw, seed=1)
    x = x.requires_grad_()
    y, lad = bernstein(x, raw, BOUND)
    (dy,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian's diagonal
    torch.testing.assert_close(lad, dy.log(), rtol=1e-12, atol=1e-12)
    assert bool((dy > 0).all())  # monotone


@pytest.mark.parametrize("n_raw", [1, 6, 17])
def test_inverse_round_trip_and_zuko(n_raw):
    x, raw = _inputs(n_raw, seed=2)
    y, lad = bernstein(x, raw, BOUND)
    x_back, lad_inv = bernstein_inverse(y, raw, BOUND)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-11)
    torch.testing.assert_close(lad_inv, -lad, rtol=0, atol=1e-9)
    # zuko's inverse bisects to about its eps (1e-6): ours agrees to that
    want = zt.BoundedBernsteinTransform(raw, bound=BOUND).inv(y)
    torch.testing.assert_close(x_back, want, rtol=0, atol=1e-5)


def test_nan_stays_in_its_element():
    x, raw = _inputs(4, shape=(5,), seed=3)
    x[2] = float("nan")
    y, lad = bernstein(x, raw, BOUND)
    assert torch.isnan(y[2]) and torch.isnan(lad[2])
    assert bool(torch.isfinite(y[[0, 1, 3, 4]]).all()) and bool(torch.isfinite(lad[[0, 1, 3, 4]]).all())
    x_back, lad_inv = bernstein_inverse(y, raw, BOUND)
    assert torch.isnan(x_back[2]) and torch.isnan(lad_inv[2])
    assert bool(torch.isfinite(x_back[[0, 1, 3, 4]]).all())
