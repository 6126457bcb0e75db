"""fastflow.integrations.zuko on zuko's own NSF (coupling and autoregressive) and NCSF."""

from __future__ import annotations

import pytest
import torch

zuko = pytest.importorskip("zuko")

import fastflow.integrations.zuko as ffz  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_equal, check_restore, check_spline_f32, check_training, check_untested_version, perturb, rel,
)
from zuko.transforms import MonotonicRQSTransform  # noqa: E402

D, C, N = 5, 3, 64


def nsf(context: int, passes, cls=None):
    torch.manual_seed(0)
    cls = cls or zuko.flows.NSF
    return perturb(cls(D, context, transforms=2, hidden_features=(16, 16), bins=6, passes=passes))


def data(context: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 2.5  # a share outside [-5, 5]'s middle, some outside
    x[:4] *= 3
    c = torch.randn(N, context, generator=g, dtype=torch.float64) if context else None
    return x, c


def dist(flow, c):
    return flow(c) if c is not None else flow()


def log_prob(flow, x, c):
    return [dist(flow, c).log_prob(x)]


def transform(flow, x, c):
    y, ladj = dist(flow, c).transform.call_and_ladj(x)
    return [y, ladj]


def inverse(flow, x, c):
    return [dist(flow, c).transform.inv(x)]


def rsample(flow, x, c):
    d = dist(flow, c)
    return [d.rsample((7,)) if c is None else d.rsample()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("context", [0, C])
@pytest.mark.parametrize("passes", [2, None], ids=["coupling", "autoregressive"])
def test_nsf_equal(passes, context, dtype):
    flow = nsf(context, passes)
    x, c = data(context)
    for fn in (log_prob, transform, inverse):
        check_equal(fn, flow, [x, c], ffz.accelerate, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("passes", [2, None], ids=["coupling", "autoregressive"])
def test_sampling_equal(passes, dtype):
    flow = nsf(C, passes)
    x, c = data(C)
    check_equal(rsample, flow, [x, c], ffz.accelerate, dtype)
    check_equal(rsample, nsf(0, passes), [x, None], ffz.accelerate, dtype)


def test_circular_nsf_equal():
    flow = nsf(C, 2, zuko.flows.NCSF)
    x, c = data(C)
    x = x.remainder(2 * torch.pi) - torch.pi
    for fn in (log_prob, inverse):
        check_equal(fn, flow, [x, c], ffz.accelerate, torch.float64)


def test_training_trajectory():
    x, c = data(C)
    x, c = x.float(), c.float()

    def batch(flow, step):
        i = (step * 16) % N
        return -flow(c[i:i + 16]).log_prob(x[i:i + 16]).mean()

    check_training(lambda: zuko.flows.NSF(D, C, transforms=2, hidden_features=(16, 16), bins=6), batch, ffz.accelerate)


def test_transform_api_and_broadcasting():
    """The accelerated transform behaves like MonotonicRQSTransform in what its API exposes."""
    g = torch.Generator().manual_seed(3)
    w, h = (torch.randn(4, 1, 6, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    d = torch.randn(4, 1, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, generator=g, dtype=torch.float64) * 3  # broadcasts against the (4, 1) batch
    ref = MonotonicRQSTransform(w, h, d, bound=4.0, slope=1e-2)
    with ffz.accelerate(backend=BACKEND):
        t = MonotonicRQSTransform(w, h, d, bound=4.0, slope=1e-2)
        y, ladj = t.call_and_ladj(x)
        assert "horizontal" not in t.__dict__  # nothing of zuko's chain ran
        assert y.shape == (4, 3) and ladj.shape == (4, 3)
        y0, l0 = ref.call_and_ladj(x)
        assert rel(y, y0) <= 1e-12 and rel(ladj, l0) <= 1e-12
        assert rel(t(x), y0) <= 1e-12 and rel(t.log_abs_det_jacobian(x, y), l0) <= 1e-12
        assert rel(t.inv(y0), ref.inv(y0)) <= 1e-10
        assert t.bins == ref.bins == 6 and repr(t) == repr(ref)
        assert t.sign == 1 and t.bijective
        # zuko's attributes are still there, by zuko's formulas
        assert torch.equal(t.horizontal, ref.horizontal) and torch.equal(t.derivatives, ref.derivatives)
        # a distribution through it (torch.distributions semantics)
        base = torch.distributions.Normal(torch.zeros(4, 3, dtype=torch.float64), 1.0)
        td = torch.distributions.TransformedDistribution(base, [MonotonicRQSTransform(w, h, d, bound=4.0, slope=1e-2)])
        lp = td.log_prob(y0)
        torch.manual_seed(0)
        smp = td.sample((2,))
    td0 = torch.distributions.TransformedDistribution(base, [ref])
    assert rel(lp, td0.log_prob(y0)) <= 1e-10
    torch.manual_seed(0)
    assert rel(smp, td0.sample((2,))) <= 1e-10


def test_spline_float32_no_worse():
    g = torch.Generator().manual_seed(4)
    n, k = 4096, 8
    x = torch.randn(n, generator=g) * 3
    w, h = (torch.randn(n, k, generator=g) * 3 for _ in range(2))
    d = torch.randn(n, k - 1, generator=g) * 3

    def peer(x, w, h, d):
        return list(MonotonicRQSTransform(w, h, d).call_and_ladj(x))

    def peer_inv(y, w, h, d):
        return [MonotonicRQSTransform(w, h, d).inv(y)]

    with ffz.accelerate(backend=BACKEND):
        fast = lambda x, w, h, d: list(MonotonicRQSTransform(w, h, d).call_and_ladj(x))  # noqa: E731
        fast_inv = lambda y, w, h, d: [MonotonicRQSTransform(w, h, d).inv(y)]  # noqa: E731
        y = MonotonicRQSTransform(w, h, d)(x)
        check_spline_f32(peer, fast, [x, w, h, d])
        check_spline_f32(peer_inv, fast_inv, [y, w, h, d])


def test_half_precision_runs_zukos_code():
    w, h, d = torch.randn(8, 6).half(), torch.randn(8, 6).half(), torch.randn(8, 5).half()
    x = torch.randn(8).half()
    y0 = MonotonicRQSTransform(w.float(), h.float(), d.float())(x.float())
    with ffz.accelerate(backend=BACKEND):
        y = MonotonicRQSTransform(w, h, d)(x)
    assert y.dtype == torch.float16 and rel(y, y0) < 1e-2


def test_no_nan_near_the_bounds():
    """Inverse at and next to the knots and +-bound in float32: zuko's own can give NaN
    (a rounding-negative discriminant); the accelerated one is finite with finite gradients."""
    g = torch.Generator().manual_seed(5)
    w, h, d = (torch.randn(2000, 8, generator=g) * 4 for _ in range(2)), None, None
    w, h = list(w)
    d = torch.randn(2000, 7, generator=g) * 4
    ref = MonotonicRQSTransform(w, h, d)
    knots = ref.vertical  # (2000, 9)
    j = torch.randint(0, 9, (2000,), generator=g)
    y = knots.gather(-1, j[:, None])[:, 0]
    y = (y + torch.randn(2000, generator=g) * 1e-6).clamp(-5, 5)
    ps = [t.clone().requires_grad_() for t in (w, h, d)]
    yy = y.clone().requires_grad_()
    with ffz.accelerate(backend=BACKEND):
        x = MonotonicRQSTransform(*ps).inv(yy)
    assert torch.isfinite(x).all()
    grads = torch.autograd.grad(x.sum(), [yy, *ps])
    assert all(torch.isfinite(gr).all() for gr in grads)
    x64 = MonotonicRQSTransform(w.double(), h.double(), d.double()).inv(y.double())
    assert (x.double() - x64).abs().max() <= 1e-4 * 5


def test_restore_exactly():
    check_restore(ffz, [(MonotonicRQSTransform, n) for n in ("__init__", "__getattr__", "_call", "_inverse",
                                                            "log_abs_det_jacobian", "call_and_ladj", "bins")])


def test_untested_version_patches_nothing(monkeypatch):
    check_untested_version(ffz, [(MonotonicRQSTransform, "_call")], monkeypatch)



@pytest.mark.parametrize("passes", [2, None], ids=["coupling", "autoregressive"])
def test_nsf_runs_the_fused_kernels(passes, monkeypatch):
    """With backend=None an accelerated NSF's log_prob, backward and sampling run the fused
    kernels of the backend fastflow picks, never the reference nor zuko's own chain."""
    from fastflow.backends import resolve_backend

    if resolve_backend("rq_spline", torch.zeros(1)) == "reference":
        pytest.skip("no compiled CPU backend here")
    import fastflow.kernels.reference.spline as reference

    def refuse(*args, **kwargs):
        raise AssertionError("a slow path ran")

    monkeypatch.setattr(reference, "forward", refuse)
    monkeypatch.setattr(reference, "backward", refuse)
    monkeypatch.setattr(MonotonicRQSTransform, "searchsorted", staticmethod(refuse))  # zuko's own chain
    calls = []
    fused = ffz._spline
    monkeypatch.setattr(ffz, "_spline", lambda *args: calls.append(args[4]) or fused(*args))
    flow = nsf(0, passes)
    x, _ = data(0)
    with ffz.accelerate():
        flow().log_prob(x.float()).sum().backward()
        flow().sample((8,))
    passes = 2 if passes else D
    assert calls.count(False) == 2 and calls.count(True) == 2 * passes  # 2 transforms, inverse `passes` times each
