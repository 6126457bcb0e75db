"""fastflow.integrations.zuko on zuko's own NSF (coupling and autoregressive), NCSF, BPF and SOSPF."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import threading
import time

import pytest
import torch

zuko = pytest.importorskip("zuko")

import fastflow.integrations.zuko as ffz  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_backend_refused_at_once, check_equal, check_nested_backend, check_restore, check_spline_f32,
    check_training, check_untested_version, perturb, rel,
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


def test_transform_api_and_broadcasting(monkeypatch):
    """The accelerated transform behaves like MonotonicRQSTransform in what its API exposes."""
    calls = []
    fused = ffz._spline
    monkeypatch.setattr(ffz, "_spline", lambda *args: calls.append(args[4]) or fused(*args))
    g = torch.Generator().manual_seed(3)
    w, h = (torch.randn(4, 1, 6, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    d = torch.randn(4, 1, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, generator=g, dtype=torch.float64) * 3  # broadcasts against the (4, 1) batch
    ref = MonotonicRQSTransform(w, h, d, bound=4.0, slope=1e-2)
    with ffz.accelerate(backend=BACKEND):
        t = MonotonicRQSTransform(w, h, d, bound=4.0, slope=1e-2)
        y, ladj = t.call_and_ladj(x)
        assert calls == [False]  # the fused op ran, not zuko's chain
        # zuko's own object less its knots, which only zuko's chain reads: computed on first access
        assert t.__dict__.keys() | set(ffz._KNOTS) == ref.__dict__.keys() and "horizontal" not in t.__dict__
        assert y.shape == (4, 3) and ladj.shape == (4, 3)
        y0, l0 = ref.call_and_ladj(x)
        assert rel(y, y0) <= 1e-12 and rel(ladj, l0) <= 1e-12
        assert rel(t(x), y0) <= 1e-12 and rel(t.log_abs_det_jacobian(x, y), l0) <= 1e-12
        assert rel(t.inv(y0), ref.inv(y0)) <= 1e-10
        assert t.bins == ref.bins == 6 and repr(t) == repr(ref)
        assert t.sign == 1 and t.bijective
        # zuko's attributes are there on access, by zuko's formulas: then exactly zuko's object,
        # and the fused op still runs it
        assert torch.equal(t.horizontal, ref.horizontal) and torch.equal(t.derivatives, ref.derivatives)
        assert torch.equal(t.vertical, ref.vertical) and t.__dict__.keys() == ref.__dict__.keys()
        calls.clear()
        assert rel(t.call_and_ladj(x)[1], l0) <= 1e-12 and calls == [False]
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


# ------------------------------------------------------------------ the polynomial laws

POLY = {"bpf": lambda c: zuko.flows.BPF(D, c, transforms=2, hidden_features=(16, 16), degree=8),
        "sospf": lambda c: zuko.flows.SOSPF(D, c, transforms=2, hidden_features=(16, 16))}


def poly(name, context):
    torch.manual_seed(0)
    return perturb(POLY[name](context), 0.2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("context", [0, C])
@pytest.mark.parametrize("name", sorted(POLY))
def test_polynomial_flows_equal(name, context, dtype):
    """log_prob and the transform with its log-det: zuko's numbers (float64 to 1e-10, float32 in
    zuko's own error class), gradients included."""
    flow = poly(name, context)
    x, c = data(context)
    for fn in (log_prob, transform):
        check_equal(fn, flow, [x, c], ffz.accelerate, dtype)


@pytest.mark.parametrize("name", sorted(POLY))
def test_polynomial_flows_run_the_fused_ops_and_invert_exactly(name, monkeypatch):
    """Accelerated, the laws run fastflow's ops (log_prob, backward, sampling; never zuko's
    autograd log-det or bisection); the inverse is the fused one, exact where zuko's bisection
    stops at its tolerance."""
    import zuko.transforms as zt

    def refuse(*args, **kwargs):
        raise AssertionError("zuko's own law ran")

    flow = poly(name, C).double()
    x, c = data(C)
    x = x / 2  # inside zuko's bisection interval, where its inverse is its best
    with ffz.accelerate(backend=BACKEND):
        monkeypatch.setattr(zt.MonotonicTransform, "call_and_ladj", refuse)
        monkeypatch.setattr(zt, "bisection", refuse)
        monkeypatch.setattr(zt.UnconstrainedMonotonicTransform, "f", refuse)
        flow(c).log_prob(x).sum().backward()
        z = flow(c).transform(x)
        back = flow(c).transform.inv(z)
        flow(c).sample((3,))
        monkeypatch.undo()
    torch.testing.assert_close(back, x, rtol=0, atol=1e-9)
    with torch.no_grad():
        plain = flow(c).transform.inv(z)  # zuko's bisection: to about its eps
    assert float((plain - x).abs().max()) < 1e-4


def test_polynomial_transforms_changed_or_subclassed_run_zukos_code():
    import zuko.transforms as zt

    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    theta = torch.randn(50, 9, generator=g, dtype=torch.float64)
    a = torch.randn(50, 2, 4, generator=g, dtype=torch.float64)
    plain_b = zt.BoundedBernsteinTransform(theta).call_and_ladj(x)
    with ffz.accelerate(backend=BACKEND):
        t = zt.BoundedBernsteinTransform(theta)
        t.theta = t.theta * 1.01  # values changed after construction: zuko's code on them
        torch.testing.assert_close(t(x), zt.BernsteinTransform.f(t, x), rtol=0, atol=0)
        t = zt.BoundedBernsteinTransform(theta, eps=1e-4)  # another eps: zuko's code
        torch.testing.assert_close(t(x), zt.BernsteinTransform.f(t, x), rtol=0, atol=0)
        got = zt.BoundedBernsteinTransform(theta).call_and_ladj(x)
        s = zt.SOSPolynomialTransform(a)
        s.g = lambda u: u * u + 1  # an own integrand: zuko's code
        torch.testing.assert_close(s(x), zt.UnconstrainedMonotonicTransform.f(s, x), rtol=0, atol=0)
        half = zt.SOSPolynomialTransform(a.half()).call_and_ladj(x.half())  # half precision: zuko's code
        assert half[0].dtype == torch.float16
    for ours, theirs in zip(got, plain_b):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_polynomial_laws_keep_zukos_code_where_only_the_reference_has_them(monkeypatch):
    """With no backend forced, a device where fastflow would pick the reference (a GPU without
    the law's Triton kernel, a machine without numba) keeps zuko's own code: the oracle is no
    fast path. A forced backend="reference" is honoured."""
    import fastflow.backends
    import zuko.transforms as zt

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, generator=g, dtype=torch.float64)
    a = torch.randn(40, 2, 4, generator=g, dtype=torch.float64)
    real = fastflow.backends.resolve_backend

    def only_the_reference(op, t, backend=None, **kw):
        return "reference" if backend is None else real(op, t, backend, **kw)

    monkeypatch.setattr(fastflow.backends, "resolve_backend", only_the_reference)
    calls = []
    import fastflow.ops

    monkeypatch.setattr(fastflow.ops, "sos_polynomial", lambda *args, **kw: calls.append(kw) or (args[0], args[0]))
    with ffz.accelerate():
        zt.SOSPolynomialTransform(a).call_and_ladj(x)
    assert not calls
    with ffz.accelerate(backend="reference"):
        zt.SOSPolynomialTransform(a).call_and_ladj(x)
    assert calls and calls[0]["backend"] == "reference"


def test_restore_exactly():
    targets = [(MonotonicRQSTransform, n) for n in ("__init__", "_call", "_inverse", "log_abs_det_jacobian",
                                                   "call_and_ladj", "__getattr__", "__getstate__")]
    targets.append((zuko.nn.MaskedLinear, "forward"))
    from zuko.transforms import BoundedBernsteinTransform, SOSPolynomialTransform

    methods = ("_call", "_inverse", "log_abs_det_jacobian", "call_and_ladj")
    targets += [(BoundedBernsteinTransform, n) for n in ("__init__", *methods)]
    targets += [(SOSPolynomialTransform, n) for n in methods]
    check_restore(ffz, targets + [(MonotonicRQSTransform, n) for n in ("bins", "__repr__")], patched=len(targets))


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


def test_nested_backend_belongs_to_the_handle(monkeypatch):
    flow = nsf(0, 2).double()
    x, _ = data(0)
    check_nested_backend(ffz, lambda: flow().log_prob(x), monkeypatch)


def test_backend_refused_at_accelerate_time():
    check_backend_refused_at_once(ffz)
    if BACKEND != "reference":
        from fastflow.backends import BACKENDS, BackendUnavailableError

        if BACKENDS["cuda"].probe() is None:  # a GPU: the cuda kernels have no zuko prologue
            with pytest.raises(BackendUnavailableError, match="'zuko'"):
                ffz.accelerate(backend="cuda")


def _transform_args():
    g = torch.Generator().manual_seed(6)
    w, h = (torch.randn(8, 6, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    d = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x = torch.randn(8, generator=g, dtype=torch.float64) * 3
    return (w, h, d), dict(bound=4.0, slope=1e-2), x


def _check_zukos_own(t, ref, x):
    """``t`` is a valid zuko transform: zuko's own methods (or the patched ones) give zuko's results."""
    assert t.__dict__.keys() == ref.__dict__.keys()
    for name in ("horizontal", "vertical", "derivatives"):
        assert torch.equal(t.__dict__[name], ref.__dict__[name])
    y0, l0 = ref.call_and_ladj(x)
    y, ladj = t.call_and_ladj(x)
    assert rel(y, y0) <= 1e-12 and rel(ladj, l0) <= 1e-12
    assert rel(t(x), y0) <= 1e-12 and rel(t.log_abs_det_jacobian(x, y0), l0) <= 1e-12
    assert rel(t.inv(y0), ref.inv(y0)) <= 1e-10
    assert t.bins == ref.bins and repr(t) == repr(ref)


def test_built_accelerated_survives_restore_and_deepcopy():
    """A transform built while accelerated is zuko's own object: after close(), restore() and
    deepcopy (made while accelerated or after), zuko's own methods work on it."""
    args, kw, x = _transform_args()
    ref = MonotonicRQSTransform(*args, **kw)
    with ffz.accelerate(backend=BACKEND):
        t = MonotonicRQSTransform(*args, **kw)
        copied = copy.deepcopy(t)
        _check_zukos_own(t, ref, x)
        _check_zukos_own(copied, ref, x)  # a copy runs zuko's code: still the same function
    for obj in (t, copied, copy.deepcopy(t)):
        _check_zukos_own(obj, ref, x)
    ffz.accelerate(backend=BACKEND)
    u = MonotonicRQSTransform(*args, **kw)
    ffz.restore()
    _check_zukos_own(u, ref, x)
    # knots assigned since construction: the patched methods follow them (zuko's code), not the raw values
    with ffz.accelerate(backend=BACKEND):
        v = MonotonicRQSTransform(*(a.flip(0) for a in args), **kw)
        v.horizontal, v.vertical, v.derivatives = ref.horizontal, ref.vertical, ref.derivatives
        _check_zukos_own(v, ref, x)


def test_built_accelerated_loads_in_a_fresh_process(tmp_path):
    """torch.save of a transform built while accelerated, loaded by a process that never
    imports fastflow: zuko's own object there."""
    args, kw, x = _transform_args()
    ref = MonotonicRQSTransform(*args, **kw)
    with ffz.accelerate(backend=BACKEND):
        torch.save(MonotonicRQSTransform(*args, **kw), tmp_path / "t.pt")
    torch.save((x, *ref.call_and_ladj(x), ref.inv(x)), tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "t = torch.load(sys.argv[1], weights_only=False)\n"
        "x, y0, l0, x0 = torch.load(sys.argv[2])\n"
        "y, ladj = t.call_and_ladj(x)\n"
        "assert torch.equal(y, y0) and torch.equal(ladj, l0) and torch.equal(t.inv(x), x0)\n"
        "assert torch.equal(t(x), y0) and t.bins == 6\n"
        "assert not any(m.startswith('fastflow') for m in sys.modules), 'fastflow imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.pt"), str(tmp_path / "expected.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_toggling_from_another_thread():
    """accelerate()/close()/restore() in a loop on one thread while two others build
    transforms and evaluate them, and evaluate flow().log_prob: every evaluation succeeds and
    gives zuko's value (bounded time)."""
    flow = nsf(C, 2).double()
    x, c = data(C)
    expected = flow(c).log_prob(x).detach()
    args, kw, xt = _transform_args()
    expected_t = MonotonicRQSTransform(*args, **kw).call_and_ladj(xt)
    stop = time.monotonic() + 2.5
    errors, counts, toggles = [], [0, 0], [0]

    def work(i):
        while time.monotonic() < stop:
            try:
                t = MonotonicRQSTransform(*args, **kw)
                time.sleep(0)  # let the toggling thread run between building and evaluating
                worst = max(rel(a, b) for a, b in zip(t.call_and_ladj(xt), expected_t))
                worst = max(worst, rel(flow(c).log_prob(x), expected))
                if not worst <= 1e-10:
                    errors.append(f"off by {worst}")
            except Exception as e:  # every failure is the finding
                errors.append(f"{type(e).__name__}: {e}")
            counts[i] += 1

    def toggle():
        while time.monotonic() < stop:
            h = ffz.accelerate(backend=BACKEND)
            time.sleep(0.0005)
            h.close() if toggles[0] % 2 else ffz.restore()
            toggles[0] += 1
            time.sleep(0.0002)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)] + [threading.Thread(target=toggle)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    finally:
        ffz.restore()
    assert not any(th.is_alive() for th in threads)
    assert not errors, (len(errors), errors[:3])
    assert min(counts) > 0 and toggles[0] > 0


def test_remembered_parameters_go_with_their_transform():
    args, kw, x = _transform_args()
    gc.collect()
    before = len(ffz._RAW)
    with ffz.accelerate(backend=BACKEND):
        for _ in range(50):
            MonotonicRQSTransform(*args, **kw)(x)
        kept = MonotonicRQSTransform(*args, **kw)
    gc.collect()
    assert len(ffz._RAW) == before + 1
    del kept
    gc.collect()
    assert len(ffz._RAW) == before


@pytest.mark.parametrize("passes", [2, None], ids=["coupling", "autoregressive"])
def test_bins_beyond_the_op_run_zukos_code(passes, monkeypatch):
    """NSF(bins=2000): more bins than the fused op takes; zuko's own code runs them."""
    calls = []
    fused = ffz._spline
    monkeypatch.setattr(ffz, "_spline", lambda *args: calls.append(args[4]) or fused(*args))
    torch.manual_seed(0)
    flow = perturb(zuko.flows.NSF(3, 0, transforms=1, hidden_features=(8,), bins=2000, passes=passes))
    x = data(0)[0][:16, :3]
    check_equal(log_prob, flow, [x, None], ffz.accelerate, torch.float64)
    check_equal(inverse, flow, [x, None], ffz.accelerate, torch.float64)
    assert calls == []


def test_knots_computed_on_first_access_as_zuko_computes_them(monkeypatch):
    """While accelerated a transform's knots are computed when first read, under the grad mode
    of its construction; restore() computes them for every live one before zuko's methods
    return; a knot assigned before that is kept (and zuko's code then runs the transform)."""
    calls = []
    fused = ffz._spline
    monkeypatch.setattr(ffz, "_spline", lambda *args: calls.append(args[4]) or fused(*args))
    (w, h, d), kw, x = _transform_args()
    w, h, d = (p.clone().requires_grad_() for p in (w, h, d))
    ref = MonotonicRQSTransform(w, h, d, **kw)
    with torch.no_grad():
        ref_ng = MonotonicRQSTransform(w, h, d, **kw)
    with ffz.accelerate(backend=BACKEND):
        with torch.no_grad():
            t_ng = MonotonicRQSTransform(w, h, d, **kw)
        t = MonotonicRQSTransform(w, h, d, **kw)
        left = MonotonicRQSTransform(w, h, d, **kw)  # never read: restore() computes its knots
        part = MonotonicRQSTransform(w, h, d, **kw)
        part.horizontal = ref.horizontal * 1  # an assigned knot: zuko's code, with it
        assert all("horizontal" not in o.__dict__ for o in (t_ng, t, left))
        assert t_ng.vertical.requires_grad is False and t.vertical.requires_grad is True
        assert rel(part(x), ref(x)) <= 1e-12 and calls == []
        assert part.__dict__["horizontal"] is not ref.horizontal and "vertical" in part.__dict__
    assert "__getattr__" not in MonotonicRQSTransform.__dict__
    for obj, r in ((t_ng, ref_ng), (t, ref), (left, ref)):
        assert obj.__dict__.keys() == r.__dict__.keys()
        for n in ffz._KNOTS:
            assert torch.equal(obj.__dict__[n], r.__dict__[n])
            assert obj.__dict__[n].requires_grad == r.__dict__[n].requires_grad
        assert rel(obj.call_and_ladj(x)[1], r.call_and_ladj(x)[1]) <= 1e-12


def test_masked_linear_keeps_its_converted_mask_bit_for_bit():
    """zuko's MaskedLinear accelerated: the same outputs and gradients bit for bit, the mask
    converted once per (mask, version, dtype), a mask changed in place or a model moved to
    another dtype followed at once, inference mode run by zuko's own forward."""
    torch.manual_seed(0)
    layer = zuko.nn.MaskedLinear(torch.rand(16, 5) < 0.5)
    x = torch.randn(32, 5)

    def run(m, x):
        x = x.clone().requires_grad_()
        y = m(x)
        grads = torch.autograd.grad((y * torch.arange(y.numel()).view(y.shape).to(y.dtype)).sum(),
                                    [x, m.weight, m.bias])
        return [y.detach(), *grads]

    for dtype in (torch.float32, torch.float64):
        layer.to(dtype)
        xs = x.to(dtype)
        plain = run(layer, xs)
        with ffz.accelerate(backend=BACKEND):
            fast = [run(layer, xs), run(layer, xs)]
            converted = ffz._MASKS[id(layer.mask)][4]
            assert converted.dtype == dtype
            with torch.no_grad():
                layer.mask[0] = ~layer.mask[0]  # in place: a new version
            changed = run(layer, xs)
            with torch.inference_mode():
                inf = layer(xs)
        want = run(layer, xs)  # zuko's own, with the changed mask
        with torch.no_grad():
            layer.mask[0] = ~layer.mask[0]
        assert all(torch.equal(a, b) for f in fast for a, b in zip(plain, f))
        assert all(torch.equal(a, b) for a, b in zip(want, changed)) and torch.equal(inf, want[0])
    key = id(layer.mask)
    del layer
    gc.collect()
    assert key not in ffz._MASKS
