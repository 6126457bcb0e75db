"""fastflow.integrations.normflows on normflows' own NSF layers (coupling and autoregressive)."""

from __future__ import annotations

import pytest
import torch

nf = pytest.importorskip("normflows")

import fastflow.integrations.normflows as ffm  # noqa: E402
from normflows.utils import splines as nm_splines  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_backend_refused_at_once, check_equal, check_nested_backend, check_restore, check_training,
    check_untested_version, perturb,
)

D, C, N = 4, 3, 64


def make_model(kind: str, context: int, seed: int = 0, scale: float = 0.3):
    torch.manual_seed(seed)
    ctx = context or None
    layers = []
    for i in range(2):
        if kind == "coupling":
            layers.append(nf.flows.CoupledRationalQuadraticSpline(D, 1, 16, num_context_channels=ctx, num_bins=6,
                                                                  reverse_mask=bool(i)))
        else:
            layers.append(nf.flows.AutoregressiveRationalQuadraticSpline(D, 1, 16, num_context_channels=ctx,
                                                                         num_bins=6))
        layers.append(nf.flows.LULinearPermute(D))
    model = nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(D, trainable=False), layers) if context \
        else nf.NormalizingFlow(nf.distributions.DiagGaussian(D, trainable=False), layers)
    return perturb(model, scale) if scale else model


def data(context: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 1.5
    x[:3] *= 4  # a few in the linear tails
    c = torch.randn(N, context, generator=g, dtype=torch.float64) if context else None
    return x, c


def log_prob(model, x, c):
    return [model.log_prob(x, c) if c is not None else model.log_prob(x)]


def forward(model, z, c):
    out, lad = model.forward_and_log_det(z, c) if c is not None else model.forward_and_log_det(z)
    return [out, lad]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("context", [0, C])
@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_nsf_equal(kind, context, dtype):
    model = make_model(kind, context)
    x, c = data(context)
    for fn in (log_prob, forward):
        check_equal(fn, model, [x, c], ffm.accelerate, dtype)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_sampling_equal(kind):
    model = make_model(kind, C)
    _, c = data(C)

    def sample(m, c):
        torch.manual_seed(3)
        return list(m.sample(16, c))

    for dtype in (torch.float64, torch.float32):
        check_equal(sample, model, [c[:16]], ffm.accelerate, dtype)


def test_training_trajectory():
    x, c = data(C)
    x, c = x.float(), c.float()

    def batch(model, step):
        i = (step * 16) % N
        return -model.log_prob(x[i:i + 16], c[i:i + 16]).mean()

    check_training(lambda: make_model("coupling", C, scale=0).float(), batch, ffm.accelerate)


def test_circular_tails_through_the_bounded_spline():
    """Circular tails keep normflows' own wrapper (periodic slopes, masking), whose inner
    bounded spline (rational_quadratic_spline, looked up in the module) runs on fastflow."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, generator=g) * 2 - 1
    w, h, d = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    y0 = nm_splines.unconstrained_rational_quadratic_spline(x, w, h, d, tails="circular", tail_bound=1.0)
    with ffm.accelerate():
        y1 = nm_splines.unconstrained_rational_quadratic_spline(x, w, h, d, tails="circular", tail_bound=1.0)
    for a, b in zip(y0, y1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True)


_TARGETS = [(nm_splines, "unconstrained_rational_quadratic_spline"), (nm_splines, "rational_quadratic_spline")]


def test_restore_exactly():
    check_restore(ffm, _TARGETS)


def test_untested_version_patches_nothing(monkeypatch):
    check_untested_version(ffm, _TARGETS, monkeypatch)


def test_nested_backend_belongs_to_the_handle(monkeypatch):
    model = make_model("coupling", 0).double()
    x, _ = data(0)
    check_nested_backend(ffm, lambda: model.log_prob(x), monkeypatch)


def test_backend_refused_at_accelerate_time():
    check_backend_refused_at_once(ffm)


def test_what_the_op_declines_runs_normflows_code():
    """K=2000 bins (more than the fused op takes) runs normflows' own spline; a min_bin_width
    too large for K raises normflows' own error."""
    g = torch.Generator().manual_seed(8)
    n, k = 32, 2000
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2
    xb = torch.rand(n, generator=g, dtype=torch.float64)
    w, h = (torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2))
    d, db = (torch.randn(n, k + j, generator=g, dtype=torch.float64) for j in (-1, 1))
    kw = dict(min_bin_width=1e-4, min_bin_height=1e-4)
    un, bd = nm_splines.unconstrained_rational_quadratic_spline, nm_splines.rational_quadratic_spline
    want = [un(x, w, h, d, tail_bound=3.0, **kw), bd(xb, w, h, db, **kw)]
    with ffm.accelerate(backend=BACKEND):
        got = [nm_splines.unconstrained_rational_quadratic_spline(x, w, h, d, tail_bound=3.0, **kw),
               nm_splines.rational_quadratic_spline(xb, w, h, db, **kw)]
        with pytest.raises(ValueError, match="Minimal bin width too large"):
            nm_splines.unconstrained_rational_quadratic_spline(x, w[:, :6], h[:, :6], d[:, :5], tail_bound=3.0,
                                                               min_bin_width=0.2)
    for a, b in zip(want, got):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # (normflows' layers keep the 1e-3 minimum bin size, so no normflows model has more than 1000 bins)
