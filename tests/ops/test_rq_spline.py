"""rq_spline: every backend against the reference, the reference and numba against nflows' own
function, round trips, the naive Jacobian log-det, gradcheck/opcheck, edge cases, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastflow.kernels.reference.spline import _knots, rq_spline_reference
from fastflow.ops import rq_spline
from fastflow.testing import (
    assert_close,
    assert_close_conditioned,
    outputs_and_grads,
    tolerances,
)
from tests._backends import ALL_BACKENDS, CPU_BACKENDS, KERNEL_BACKENDS, device_for, dtypes_for, float32_in_float32

nflows_rq = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
nflows_spline = nflows_rq.unconstrained_rational_quadratic_spline



def tol(backend, dtype):
    return tolerances(dtype, float32_in_float32(backend, "spline"))


def make_params(shape, k, scale=2.0, dtype=torch.float64, device="cpu", tail_bound=1.0, gen=None):
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * tail_bound * 0.8
    uw = torch.randn(*shape, k, dtype=torch.float64, generator=gen) * scale
    uh = torch.randn(*shape, k, dtype=torch.float64, generator=gen) * scale
    ud = torch.randn(*shape, k - 1, dtype=torch.float64, generator=gen) * scale
    return [t.to(dtype=dtype, device=device) for t in (x, uw, uh, ud)]


# ------------------------------------------------------------------ backends vs reference


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8, 23])
def test_backend_matches_reference(backend, inverse, k):
    device = device_for(backend)
    n = 2**9 + 17
    for dtype in dtypes_for(backend):
        # Parameters at the scale a trained conditioner produces; extreme ones are tested below.
        x, uw, uh, ud = make_params((n,), k, scale=1.5, device=device)
        x = x * 1.4  # a share of the points in the linear tails
        if inverse:
            x = rq_spline_reference(x, uw, uh, ud)[0]
        t = [v.to(dtype) for v in (x, uw, uh, ud)]
        g_out = torch.randn(n, dtype=torch.float64, device=device)
        g_lad = torch.randn(n, dtype=torch.float64, device=device)
        # Oracle: the reference evaluated in float64 on the same (rounded) inputs.
        ref = outputs_and_grads(rq_spline, [v.double() for v in t], g_out, g_lad, inverse=inverse, backend="reference")
        got = outputs_and_grads(rq_spline, t, g_out, g_lad, inverse=inverse, backend=backend)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        # Kernels that compute in float32 (GPU backends) meet float32 round-off amplified by the
        # inverse's conditioning |dx/dy| = exp(lad_inverse): the inverse is held to that.
        f32_compute = float32_in_float32(backend, "spline") and dtype == torch.float32
        amplification = ref[1].exp() if inverse and f32_compute else torch.zeros_like(ref[1])
        rtol, atol = tolerances(dtype, f32_compute).values()
        assert_close_conditioned(got[0], ref[0], amplification, dtype, "outputs")
        # The inverse's gradients carry the conditioning squared; one more decade for them.
        factor = 10.0 if inverse and f32_compute else 1.0
        assert_close(got[1], ref[1], dtype, rtol=rtol * factor, atol=atol * factor)
        for g, r in zip(got[2], ref[2]):
            assert g.dtype == dtype
            # Gradients are compared relative to their scale: raw-parameter gradients mix
            # terms of very different size.
            scale = r.abs().max().clamp_min(1.0)
            assert_close(g / scale, r / scale, dtype, rtol=rtol * factor, atol=atol * factor)


# ------------------------------------------------------------------ against nflows


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8, 64])
def test_matches_nflows_float64(backend, inverse, k):
    gen = torch.Generator().manual_seed(k)
    x, uw, uh, ud = make_params((1000,), k, scale=4.0, tail_bound=2.5, gen=gen)
    x = x * 1.5
    g_out, g_lad = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    ref = outputs_and_grads(nflows_spline, (x, uw, uh, ud), g_out, g_lad, inverse=inverse, tail_bound=2.5)
    got = outputs_and_grads(rq_spline, (x, uw, uh, ud), g_out, g_lad, inverse=inverse, tail_bound=2.5, backend=backend)
    for a, b in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max().clamp_min(1.0)))


def _max_err(a, oracle):
    return float((a.double() - oracle).abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_float32_never_worse_than_nflows(backend, inverse):
    gen = torch.Generator().manual_seed(7)
    x64, uw64, uh64, ud64 = make_params((4000,), 8, scale=4.0, gen=gen)
    x64 = x64 * 1.3
    if inverse:
        x64 = rq_spline_reference(x64, uw64, uh64, ud64)[0]
    x, uw, uh, ud = (t.float() for t in (x64, uw64, uh64, ud64))
    g_out, g_lad = torch.randn(4000), torch.randn(4000)
    # The oracle is nflows in float64 on the float32 inputs.
    oracle = outputs_and_grads(nflows_spline, [t.double() for t in (x, uw, uh, ud)], g_out, g_lad, inverse=inverse)
    theirs = outputs_and_grads(nflows_spline, (x, uw, uh, ud), g_out, g_lad, inverse=inverse)
    ours = outputs_and_grads(rq_spline, (x, uw, uh, ud), g_out, g_lad, inverse=inverse, backend=backend)
    names = ["outputs", "logabsdet", "grad inputs", "grad widths", "grad heights", "grad derivatives"]
    for name, o, t, r in zip(names, (ours[0], ours[1], *ours[2]), (theirs[0], theirs[1], *theirs[2]),
                             (oracle[0], oracle[1], *oracle[2])):
        e_ours, e_theirs = _max_err(o, r), _max_err(t, r)
        assert e_ours <= e_theirs, f"{name}: our float32 error {e_ours:.3g} > nflows' {e_theirs:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_inverse_where_nflows_asserts(backend):
    # Points on (or one ulp beside) the height knots with extreme parameters: there nflows'
    # float32 inverse computes a negative discriminant and raises.
    failures = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        n, k = 4096, 8
        uw, uh = torch.randn(n, k, generator=gen) * 5, torch.randn(n, k, generator=gen) * 5
        ud = torch.randn(n, k - 1, generator=gen) * 5
        ch, _ = _knots(uh.double(), -1.0, 1.0, 1e-3)
        j = torch.randint(0, k + 1, (n,), generator=gen)
        y = ch.gather(-1, j[:, None])[:, 0].float()
        y = torch.nextafter(y, y + torch.randn(n, generator=gen))
        try:
            nflows_spline(y, uw, uh, ud, inverse=True)
        except AssertionError:
            failures += 1
        else:
            continue
        out, lad = rq_spline(y, uw, uh, ud, inverse=True, backend=backend)
        ref_out, ref_lad = rq_spline_reference(*(t.double() for t in (y, uw, uh, ud)), inverse=True)
        assert torch.isfinite(out).all() and torch.isfinite(lad).all()
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-6)
        torch.testing.assert_close(lad.double(), ref_lad, rtol=1e-4, atol=1e-3)
    assert failures > 0, "no input made nflows' float32 inverse assert: the test lost its point"


# ------------------------------------------------------------------ maths


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inputs_on_knots_and_bounds(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    k, b = 6, 2.0
    _, uw, uh, ud = make_params((4,), k, dtype=torch.float64)
    cw, _ = _knots(uw, -b, b, 1e-3)
    ch, _ = _knots(uh, -b, b, 1e-3)
    # Every knot (ends included), and points just beyond the bounds, for each of 4 parameter rows.
    for inverse, knots in ((False, cw), (True, ch)):
        xs = torch.cat([knots, torch.tensor([[-b - 1e-9, b + 1e-9, -7.0, 7.0]], dtype=torch.float64).expand(4, 4)], 1)
        m = xs.shape[1]
        args = [xs.reshape(-1)] + [p[:, None].expand(4, m, p.shape[-1]).reshape(4 * m, -1) for p in (uw, uh, ud)]
        args = [a.to(dtype=dtype, device=device).contiguous() for a in args]
        got = rq_spline(*args, inverse=inverse, tail_bound=b, backend=backend)
        ref = rq_spline_reference(*(a.double() for a in args), inverse=inverse, tail_bound=b)
        # Exactly on a knot the bin may differ by rounding; the function is continuous there,
        # so outputs agree up to the slope times the rounding.
        assert_close_conditioned(got[0], ref[0], ref[1].exp(), dtype, "outputs on knots")
        flat_x = args[0]
        outside = flat_x.abs() > b
        assert torch.equal(got[0][outside], flat_x[outside])
        assert torch.all(got[1][outside] == 0)
        # The knots map to the knots of the other axis.
        on_knot = got[0].reshape(4, m)[:, : k + 1]
        other = (ch if not inverse else cw)
        slope = ref[1].exp().reshape(4, m)[:, : k + 1]
        assert_close_conditioned(on_knot, other, slope, dtype, "knots map to knots")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_extreme_parameters(backend, inverse):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    n, k = 301, 8
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 1.1
    params = [((torch.rand(n, kk, generator=gen, dtype=torch.float64) > 0.5) * 100.0 - 50.0) for kk in (k, k, k - 1)]
    if inverse:
        x = rq_spline_reference(x, *params)[0]
    t = [v.to(dtype=dtype, device=device) for v in (x, *params)]
    got = rq_spline(*t, inverse=inverse, backend=backend)
    ref = rq_spline_reference(*(v.double() for v in t), inverse=inverse)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    if dtype == torch.float64:
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-9)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
    else:
        # Slopes here reach 1e+-5: float32 arithmetic is held to round-off times the slope.
        slope = ref[1].abs().exp()
        f32 = float32_in_float32(backend, "spline")
        assert_close_conditioned(got[0], ref[0], slope, dtype, "outputs", f32)
        if not inverse:
            # The log-det's sensitivity grows with the curvature as well as the slope; where the
            # slope is extreme (>1e3) a float32 kernel owes finiteness and the outputs above.
            moderate = slope < 1e3
            assert_close_conditioned(got[1][moderate], ref[1][moderate], slope[moderate], dtype, "logabsdet", f32)
        else:
            # The inverse is judged where it is well-posed, in y-space: the forward map of the
            # returned x gives back y up to float32 round-off times the forward slope.
            y_back, fwd_lad = rq_spline_reference(got[0].double(), *(v.double() for v in t[1:]))
            assert_close_conditioned(y_back, t[0], fwd_lad.exp(), dtype, "forward(inverse(y))", f32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_and_broadcast(backend):
    device = device_for(backend)
    x, uw, uh, ud = make_params((40, 12), 5, dtype=torch.float32, device=device)
    xt = x.t()  # (12, 40), non-contiguous
    uwt, uht, udt = (p.transpose(0, 1) for p in (uw, uh, ud))
    assert not xt.is_contiguous() and not uwt.is_contiguous()
    out, lad = rq_spline(xt, uwt, uht, udt, backend=backend)
    ref = rq_spline(xt.contiguous(), uwt.contiguous(), uht.contiguous(), udt.contiguous(), backend="reference")
    assert_close(out, ref[0], **tol(backend, out.dtype))
    assert_close(lad, ref[1], **tol(backend, out.dtype))
    # Parameters shared along the batch dimension broadcast, and their gradient sums back.
    shared = [p[:1].clone().requires_grad_(True) for p in (uw, uh, ud)]
    out, lad = rq_spline(x, *shared, backend=backend)
    expanded = [p.detach().expand(40, 12, p.shape[-1]).clone().requires_grad_(True) for p in shared]
    out2, lad2 = rq_spline(x, *expanded, backend="reference")
    assert_close(out, out2, **tol(backend, out.dtype))
    (out.sum() + lad.sum()).backward()
    (out2.sum() + lad2.sum()).backward()
    for p, e in zip(shared, expanded):
        assert_close(p.grad, e.grad.sum(0, keepdim=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_stays_in_its_element(backend):
    device = device_for(backend)
    x, uw, uh, ud = make_params((64,), 6, dtype=torch.float32, device=device)
    x[5] = float("nan")
    uw[9, 2] = float("nan")
    out, lad = rq_spline(x, uw, uh, ud, backend=backend)
    bad = torch.zeros(64, dtype=torch.bool)
    bad[5] = True
    bad[9] = abs(float(x[9])) <= 1.0  # an outside element ignores its parameters
    assert torch.isnan(out[5]) and torch.isnan(lad[5])
    assert torch.isfinite(out.cpu()[~bad]).all() and torch.isfinite(lad.cpu()[~bad]).all()
    ref = rq_spline_reference(x.double(), uw.double(), uh.double(), ud.double())
    assert_close(out.cpu()[~bad], ref[0].cpu()[~bad], **tol(backend, out.dtype))


# ------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 33),
    n=st.integers(1, 70),
    scale=st.floats(0.0, 20.0),
    bound=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_monotone_invertible(k, n, scale, bound, seed):
    gen = torch.Generator().manual_seed(seed)
    x, uw, uh, ud = make_params((n,), k, scale=scale, tail_bound=bound, gen=gen)
    x = torch.sort(x * 1.5).values
    y, lad = rq_spline(x, uw[:1].expand(n, k), uh[:1].expand(n, k), ud[:1].expand(n, k - 1), tail_bound=bound,
                       backend="numba")
    assert torch.isfinite(y).all() and torch.isfinite(lad).all()
    assert torch.all(y[1:] >= y[:-1])  # one spline (shared parameters) is monotone
    assert torch.all(y.abs() <= torch.maximum(x.abs(), torch.tensor(bound, dtype=x.dtype)) + 1e-12)
    x2, lad2 = rq_spline(y, uw[:1].expand(n, k), uh[:1].expand(n, k), ud[:1].expand(n, k - 1), inverse=True,
                         tail_bound=bound, backend="numba")
    # the inverse's error is y's rounding times |dx/dy| = exp(-lad): large where a bin is steep
    # (scale ~16 makes slopes of 1e-6 possible), so the bound carries that conditioning
    cond = torch.exp(-lad).clamp_min(1.0)
    assert bool(((x2 - x).abs() <= 1e-9 * bound + 64 * 2.0**-52 * bound * cond + 1e-9 * x.abs()).all())
    torch.testing.assert_close(lad + lad2, torch.zeros_like(lad), rtol=0, atol=1e-7)
    ref = rq_spline_reference(x, uw[:1].expand(n, k), uh[:1].expand(n, k), ud[:1].expand(n, k - 1), tail_bound=bound)
    torch.testing.assert_close(y, ref[0], **tolerances(torch.float64))


# ------------------------------------------------------------------ bad input and dispatch


def test_half_precision_on_cpu_uses_reference():
    x, uw, uh, ud = make_params((50,), 4, dtype=torch.float32)
    out, lad = rq_spline(*(t.bfloat16() for t in (x, uw, uh, ud)))
    ref = rq_spline_reference(*(t.bfloat16().double() for t in (x, uw, uh, ud)))
    assert out.dtype == torch.bfloat16
    assert_close(out, ref[0])
    assert math.isfinite(float(lad.float().sum()))


# ------------------------------------------------------------------ the entries for callers with a fallback


def _spline_specs():
    from fastflow.ops._samples import SPECS
    from fastflow.ops.rq_spline import _rq_spline_op

    # the parameterisations of the spline op itself (rq_spline_circular runs its kernels in its own op)
    return [s for s in SPECS.values() if s.fused() is _rq_spline_op]


_PARAM = {"rq_spline": "nflows", "rq_spline_bounded": "nflows_bounded", "rq_spline_zuko": "zuko"}


def _entry_kwargs(name, kwargs):
    """The public function's keyword arguments as rq_spline_accepts/rq_spline_unchecked take them."""
    kw = dict(kwargs)
    if name == "rq_spline_zuko":
        kw["tail_bound"] = kw.pop("bound", 5.0)
        kw["slope"] = kw.pop("slope", 1e-3)  # zuko's slope is its own argument there too
    if name == "rq_spline_bounded":
        kw["box"] = tuple(kw.pop(k, d) for k, d in (("left", 0.0), ("right", 1.0), ("bottom", 0.0), ("top", 1.0)))
    return kw


@pytest.mark.parametrize("spec", _spline_specs(), ids=lambda s: s.name)
def test_accepts_is_the_public_functions_contract(spec):
    """rq_spline_accepts says yes exactly where the public function runs: on its examples, and no
    on every declared bad input (integrations ask it instead of copying the checks)."""
    from fastflow.ops.rq_spline import rq_spline_accepts

    param = _PARAM[spec.name]
    gen = torch.Generator().manual_seed(0)
    tensors, kwargs = spec.example(spec.shapes[0], torch.float32, "cpu", gen)  # what the bad inputs mutate
    assert rq_spline_accepts(*tensors, parameterization=param, **_entry_kwargs(spec.name, kwargs))
    for bad in spec.bad:
        t, kw = bad.mutate(list(tensors), dict(kwargs))
        with pytest.raises(bad.error):
            spec.fn(*t, **kw)
        assert not rq_spline_accepts(*t, parameterization=param, **_entry_kwargs(spec.name, kw)), bad.label


@pytest.mark.parametrize("spec", _spline_specs(), ids=lambda s: s.name)
@pytest.mark.parametrize("inverse", [False, True])
def test_unchecked_entry_is_the_public_function(spec, inverse):
    """Bit for bit the public function's outputs and gradients (broadcast parameters included)."""
    from fastflow.ops.rq_spline import rq_spline_unchecked

    gen = torch.Generator().manual_seed(1)
    tensors, kwargs = spec.example(spec.shapes[0], torch.float64, "cpu", gen, **spec.options[0])
    for backend in ("reference", "numba"):
        a = [t.clone().requires_grad_(True) for t in tensors]
        b = [t.clone().requires_grad_(True) for t in tensors]
        want = spec.fn(*a, inverse=inverse, backend=backend, **kwargs)
        got = rq_spline_unchecked(*b, parameterization=_PARAM[spec.name], inverse=inverse, backend=backend,
                                  **_entry_kwargs(spec.name, kwargs))
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        gw = torch.autograd.grad(sum(w.sum() for w in want), a)
        gg = torch.autograd.grad(sum(g.sum() for g in got), b)
        for g, w in zip(gg, gw):
            assert torch.equal(g, w)
