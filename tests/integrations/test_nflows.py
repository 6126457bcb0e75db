"""fastflow.integrations.nflows on nflows' own NSF transforms (coupling, autoregressive; linear
tails and the bounded tails=None spline)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nflows")

import fastflow.integrations.nflows as ffn  # noqa: E402
from nflows.distributions.normal import StandardNormal  # noqa: E402
from nflows.flows.base import Flow  # noqa: E402
from nflows.nn.nets import ResidualNet  # noqa: E402
from nflows.transforms import autoregressive as nf_ar  # noqa: E402
from nflows.transforms import splines as nf_splines  # noqa: E402
from nflows.transforms.base import CompositeTransform  # noqa: E402
from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform  # noqa: E402
from nflows.transforms.permutations import ReversePermutation  # noqa: E402
from nflows.transforms.splines import rational_quadratic as nf_rq  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_backend_refused_at_once, check_equal, check_nested_backend, check_restore, check_spline_f32,
    check_training, check_untested_version, flow_data, perturb,
)

D, C, N = 4, 3, 64


def make_flow(kind: str, context: int, tails="linear", seed: int = 0, scale: float = 0.3):
    torch.manual_seed(seed)
    ctx = context or None
    layers = []
    for i in range(2):
        if kind == "coupling":
            layers.append(PiecewiseRationalQuadraticCouplingTransform(
                mask=torch.arange(D) % 2 == i % 2,
                transform_net_create_fn=lambda fi, fo: ResidualNet(fi, fo, 16, context_features=ctx, num_blocks=1),
                num_bins=6, tails=tails, tail_bound=3.0))
        else:
            layers.append(nf_ar.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                D, 16, context_features=ctx, num_bins=6, tails=tails, tail_bound=3.0, num_blocks=1))
        layers.append(ReversePermutation(D))
    flow = Flow(CompositeTransform(layers), StandardNormal([D]))
    return perturb(flow, scale) if scale else flow


def data(context: int, bounded: bool = False):
    return flow_data(N, D, context, bounded)


def log_prob(flow, x, c):
    return [flow.log_prob(x, context=c)]


def forward(flow, x, c):
    z, lad = flow._transform(x, context=c)
    return [z, lad]


def inverse(flow, x, c):
    y, lad = flow._transform.inverse(x, context=c)
    return [y, lad]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("context", [0, C])
@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_nsf_equal(kind, context, dtype):
    flow = make_flow(kind, context)
    x, c = data(context)
    for fn in (log_prob, forward, inverse):
        check_equal(fn, flow, [x, c], ffn.accelerate, dtype)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_bounded_spline_equal(kind):
    """tails=None: nflows' rational_quadratic_spline (K+1 slopes on [0, 1]) on the fused op."""
    flow = make_flow(kind, C, tails=None, scale=0.1)
    x, c = data(C, bounded=True)
    for dtype in (torch.float64, torch.float32):
        check_equal(lambda f, x, c: list(f._transform._transforms[0](x, context=c)), flow, [x, c], ffn.accelerate,
                    dtype)
        y = flow._transform._transforms[0](x.to(dtype), context=c.to(dtype))[0].detach().clamp(0, 1)
        check_equal(lambda f, y, c: list(f._transform._transforms[0].inverse(y, context=c)), flow, [y, c],
                    ffn.accelerate, dtype)


def test_bounded_domain_error_kept():
    from nflows.transforms.base import InputOutsideDomain

    x = torch.full((8,), 1.5)
    p = torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(8, 5)
    with ffn.accelerate(backend=BACKEND), pytest.raises(InputOutsideDomain):
        nf_splines.rational_quadratic_spline(x, *p)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_sampling_equal(kind):
    flow = make_flow(kind, C)
    _, c = data(C)

    def sample(f, c):
        torch.manual_seed(3)
        return [f.sample(2, context=c)]

    # nflows' StandardNormal draws float32 noise whatever the model's dtype, so its sample() runs
    # in float32 only (the float64 inverse is tested in test_nsf_equal, float32 accuracy there too)
    flow = flow.float()
    c = c[:16].float()
    with torch.no_grad():
        plain = sample(flow, c)[0]
        with ffn.accelerate(backend=BACKEND):
            fast = sample(flow, c)[0]
    assert torch.isfinite(fast).all() and fast.shape == plain.shape
    assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max()


def test_spline_float32_no_worse():
    g = torch.Generator().manual_seed(4)
    n, k = 4096, 8
    x = torch.randn(n, generator=g) * 2
    w, h, d = (torch.randn(n, k + j, generator=g) * 3 for j in (0, 0, -1))
    db = torch.randn(n, k + 1, generator=g) * 3
    xb = torch.rand(n, generator=g)
    un = nf_rq.unconstrained_rational_quadratic_spline
    bd = nf_rq.rational_quadratic_spline
    with ffn.accelerate(backend=BACKEND):
        fast_un, fast_bd = nf_rq.unconstrained_rational_quadratic_spline, nf_rq.rational_quadratic_spline
        for inv in (False, True):
            inp = x if not inv else un(x, w, h, d, tail_bound=3.0)[0].detach()
            check_spline_f32(lambda x, w, h, d: list(un(x, w, h, d, inverse=inv, tail_bound=3.0)),
                             lambda x, w, h, d: list(fast_un(x, w, h, d, inverse=inv, tail_bound=3.0)), [inp, w, h, d])
            check_spline_f32(lambda x, w, h, d: list(bd(x, w, h, d, inverse=inv)),
                             lambda x, w, h, d: list(fast_bd(x, w, h, d, inverse=inv)), [xb, w, h, db])


def test_training_trajectory():
    x, c = data(C)
    x, c = x.float(), c.float()

    def batch(flow, step):
        i = (step * 16) % N
        return -flow.log_prob(x[i:i + 16], context=c[i:i + 16]).mean()

    check_training(lambda: make_flow("autoregressive", C, scale=0).float(), batch, ffn.accelerate)


def test_no_negative_discriminant_assertion():
    """nflows' own inverse asserts (discriminant >= 0) when float32 rounding makes it slightly
    negative, near the knots; accelerated sampling is finite there and matches float64."""
    g = torch.Generator().manual_seed(0)
    n, k = 20000, 8
    w, h = (torch.randn(n, k, generator=g) * 5 for _ in range(2))
    d = torch.randn(n, k - 1, generator=g) * 5
    import torch.nn.functional as F

    cum = F.pad(torch.cumsum(1e-3 + (1 - 1e-3 * k) * torch.softmax(h, -1), -1), (1, 0)) * 6 - 3
    y = cum.gather(-1, torch.randint(1, k, (n, 1), generator=g))[:, 0] * (1 - 1e-7)
    with pytest.raises(AssertionError):
        nf_rq.unconstrained_rational_quadratic_spline(y, w, h, d, inverse=True, tail_bound=3.0)
    ps = [t.clone().requires_grad_() for t in (y, w, h, d)]
    with ffn.accelerate(backend=BACKEND):
        x, lad = nf_rq.unconstrained_rational_quadratic_spline(*ps, inverse=True, tail_bound=3.0)
    grads = torch.autograd.grad(x.sum() + lad.sum(), ps)
    assert torch.isfinite(x).all() and torch.isfinite(lad).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    from fastflow.ops import rq_spline

    x64, _ = rq_spline(*(t.double() for t in (y, w, h, d)), inverse=True, tail_bound=3.0, backend="reference")
    assert (x.double() - x64).abs().max() <= 1e-4


def test_no_nan_gradients_in_the_tails():
    """Values in the linear tails and exactly on +-tail_bound: finite gradients everywhere."""
    x = torch.tensor([-7.0, -3.0, -2.999, 0.0, 2.999, 3.0, 1e4]).requires_grad_()
    w, h = (torch.randn(7, 6).mul(8).requires_grad_() for _ in range(2))
    d = torch.randn(7, 5).mul(8).requires_grad_()
    with ffn.accelerate(backend=BACKEND):
        for inv in (False, True):
            y, lad = nf_rq.unconstrained_rational_quadratic_spline(x, w, h, d, inverse=inv, tail_bound=3.0)
            grads = torch.autograd.grad(y.sum() + lad.sum(), [x, w, h, d])
            assert all(torch.isfinite(gr).all() for gr in grads)
            assert torch.equal(y[[0, 6]], x[[0, 6]].detach())


def _targets():
    return [(m, a) for m in (nf_rq, nf_splines, nf_ar)
            for a in ("unconstrained_rational_quadratic_spline", "rational_quadratic_spline") if hasattr(m, a)]


def test_restore_exactly():
    check_restore(ffn, _targets())


def test_untested_version_patches_nothing(monkeypatch):
    check_untested_version(ffn, _targets(), monkeypatch)


def test_nested_backend_belongs_to_the_handle(monkeypatch):
    flow = make_flow("coupling", 0).double()
    x, _ = data(0)
    check_nested_backend(ffn, lambda: flow.log_prob(x), monkeypatch)


def test_backend_refused_at_accelerate_time():
    check_backend_refused_at_once(ffn)


def _spline_args(k, n=32, seed=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2
    w, h = (torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2))
    return x, w, h, torch.randn(n, k - 1, generator=g, dtype=torch.float64), torch.randn(n, k + 1, generator=g,
                                                                                          dtype=torch.float64)


def test_what_the_op_declines_runs_nflows_code():
    """K=2000 bins (more than the fused op takes) runs nflows' own spline, in the functions and
    in a model; a min_bin_width too large for K raises nflows' own error."""
    un, bd = nf_rq.unconstrained_rational_quadratic_spline, nf_rq.rational_quadratic_spline
    x, w, h, d, db = _spline_args(2000)
    xb = torch.rand(x.shape, dtype=torch.float64)
    kw = dict(min_bin_width=1e-4, min_bin_height=1e-4)
    want = [un(x, w, h, d, tail_bound=3.0, **kw), bd(xb, w, h, db, **kw)]
    with ffn.accelerate(backend=BACKEND):
        got = [nf_rq.unconstrained_rational_quadratic_spline(x, w, h, d, tail_bound=3.0, **kw),
               nf_rq.rational_quadratic_spline(xb, w, h, db, **kw)]
        x6, w6, h6, d6, _ = _spline_args(6)
        with pytest.raises(ValueError, match="Minimal bin width too large"):
            nf_rq.unconstrained_rational_quadratic_spline(x6, w6, h6, d6, tail_bound=3.0, min_bin_width=0.2)
    for a, b in zip(want, got):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)
    layer = PiecewiseRationalQuadraticCouplingTransform(
        mask=torch.arange(D) % 2 == 0, num_bins=2000, tails="linear", tail_bound=3.0, min_bin_width=1e-4,
        min_bin_height=1e-4, transform_net_create_fn=lambda fi, fo: ResidualNet(fi, fo, 8, num_blocks=1))
    flow = perturb(Flow(layer, StandardNormal([D])))
    xs, _ = data(0)
    check_equal(log_prob, flow, [xs[:16], None], ffn.accelerate, torch.float64)
