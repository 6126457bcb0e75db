"""The spline's other parameterisations, "nflows_bounded" (``rq_spline_bounded``) and "zuko"
(``rq_spline_zuko``), on every backend, beyond what the conformance suite checks for every
declared op (round trips, the naive log-det, gradcheck, opcheck, every derivative mode: see
``tests/ops/test_conformance.py``): against the reference maths' autograd at several K and in
16-bit storage, the box's outside, NaN, empty and broadcast inputs, the messages of bad input,
and against the peers' own functions (nflows' ``rational_quadratic_spline``, zuko's
``MonotonicRQSTransform``) in float64.

The Triton kernels run here under ``TRITON_INTERPRET=1 pytest -m triton`` (the ``triton`` mark
of ``tests/_backends.py``). The interpreter turns the kernels' float64 scalar arguments (box,
minimum sizes, slope) into float32 constants, where a compiled kernel takes them as float64: the
scalars used here are exact in float32, so that float64 results can be held to 1e-10.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastflow import BackendUnavailableError
from fastflow.backends import BACKENDS, resolve_backend
from fastflow.kernels.reference.spline import rq_spline_param_reference
from fastflow.ops.rq_spline import rq_spline_bounded, rq_spline_zuko
from fastflow.testing import assert_close_conditioned, outputs_and_grads, tolerances
from tests._backends import ALL_BACKENDS, INTERPRET, device_for, float32_in_float32

nflows_rq = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
zuko_transforms = pytest.importorskip("zuko.transforms")

KINDS = ["nflows_bounded", "zuko"]
MIN = 2.0**-10  # minimum bin sizes and slopes (exact in float32, see the module docstring)
# nflows_bounded: an asymmetric box; zuko: the box [-bound, bound]^2
BOXES = {"nflows_bounded": (-2.5, 3.0, -1.75, 2.25), "zuko": (-4.0, 4.0, -4.0, 4.0)}
SETTINGS = {  # the op's scalar arguments: (min_bin_width, min_bin_height, min_derivative)
    "nflows_bounded": (MIN, MIN, MIN),
    "zuko": (0.0, 0.0, MIN),  # the launchers' md slot holds zuko's slope
}
F64_RTOL = 1e-10


def dtypes_for(backend):
    """Every storage dtype the backend declares for the spline op."""
    return list(BACKENDS[backend].takes("rq_spline"))


def n_derivs(kind, k):
    return k + 1 if kind == "nflows_bounded" else k - 1


def spline(kind, inverse=False, backend=None):
    """The public function of ``kind`` as ``f(x, uw, uh, ud) -> (out, lad)``."""
    left, right, bottom, top = BOXES[kind]
    mbw, mbh, md = SETTINGS[kind]
    if kind == "zuko":
        return lambda x, uw, uh, ud: rq_spline_zuko(x, uw, uh, ud, inverse=inverse, bound=right, slope=md,
                                                    backend=backend)
    return lambda x, uw, uh, ud: rq_spline_bounded(x, uw, uh, ud, inverse=inverse, left=left, right=right,
                                                   bottom=bottom, top=top, min_bin_width=mbw, min_bin_height=mbh,
                                                   min_derivative=md, backend=backend)


def reference(kind, inverse=False):
    """The reference maths of ``kind`` in plain differentiable torch ops (the autograd oracle)."""
    mbw, mbh, md = SETTINGS[kind]
    return lambda x, uw, uh, ud: rq_spline_param_reference(x, uw, uh, ud, inverse, kind, BOXES[kind], mbw, mbh, md)


def make(kind, shape, k, inverse=False, scale=1.5, outside=0.1, gen=None):
    """float64 inputs in the direction's domain (a share ``outside`` of it beyond each end) and raw
    parameters at a trained conditioner's scale."""
    left, right, bottom, top = BOXES[kind]
    lo, hi = (bottom, top) if inverse else (left, right)
    u = torch.rand(shape, dtype=torch.float64, generator=gen) * (1 + 2 * outside) - outside
    x = lo + (hi - lo) * u
    uw = torch.randn(*shape, k, dtype=torch.float64, generator=gen) * scale
    uh = torch.randn(*shape, k, dtype=torch.float64, generator=gen) * scale
    ud = torch.randn(*shape, n_derivs(kind, k), dtype=torch.float64, generator=gen) * scale
    return [x, uw, uh, ud]


def on(ts, dtype, device):
    return [t.to(dtype=dtype, device=device) for t in ts]


def _close64(got, ref, what, rtol=F64_RTOL):
    # float64: 1e-10 relative, the absolute part scaled by the tensor's largest entry (a
    # raw-parameter gradient entry is a difference of terms of that size and carries their round-off).
    for i, (a, b) in enumerate(zip(got, ref)):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        scale = float(b.abs().max().clamp_min(1.0)) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ------------------------------------------------------------------ every backend vs the reference


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 5, 8])  # K=2 and 8 fill their padded tile (K+1 slopes spill past it)
def test_matches_reference_autograd(backend, kind, inverse, k):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(1000 * k + inverse + 10 * KINDS.index(kind))
    n = 193
    base = make(kind, (n,), k, inverse, gen=gen)
    g_out = torch.randn(n, dtype=torch.float64, generator=gen)
    g_lad = torch.randn(n, dtype=torch.float64, generator=gen)
    for dtype in dtypes_for(backend):
        t = on(base, dtype, device)
        # Oracle: autograd of the reference maths in float64 on the same (rounded) inputs.
        ref = outputs_and_grads(reference(kind, inverse), [v.double().cpu() for v in t], g_out, g_lad)
        got = outputs_and_grads(spline(kind, inverse, backend), t, g_out.to(device), g_lad.to(device))
        assert got[0].dtype == dtype and got[1].dtype == dtype and all(g.dtype == dtype for g in got[2])
        if dtype == torch.float64:
            _close64((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]), f"{backend} {kind} float64")
            continue
        f32 = float32_in_float32(backend, "spline")
        rtol, atol = tolerances(dtype, f32).values()
        # float32 arithmetic meets round-off amplified by the inverse's conditioning |dx/dy|.
        amp = ref[1].exp() if inverse and f32 else torch.zeros_like(ref[1])
        assert_close_conditioned(got[0], ref[0], amp, dtype, "outputs", f32)
        factor = 10.0 if inverse and f32 else 1.0  # the inverse's gradients: conditioning squared
        torch.testing.assert_close(got[1].double().cpu(), ref[1], rtol=rtol * factor, atol=atol * factor)
        for name, g, r in zip(("x", "widths", "heights", "derivatives"), got[2], ref[2]):
            scale = r.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.double().cpu() / scale, r / scale, rtol=rtol * factor, atol=atol * factor,
                                       msg=lambda m, name=name: f"{backend} {kind} {dtype} grad {name}: {m}")


# ------------------------------------------------------------------ edges of the box, NaN, shapes


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_outside_the_box_is_the_identity(backend, kind, inverse):
    device = device_for(backend)
    left, right, bottom, top = BOXES[kind]
    lo, hi = (bottom, top) if inverse else (left, right)
    olo, ohi = (left, right) if inverse else (bottom, top)
    xs = torch.tensor([lo, hi, lo - 50.0, hi + 1e3, -1e30, 1e30, lo, hi], dtype=torch.float64)
    n, k = xs.numel(), 6
    gen = torch.Generator().manual_seed(8)
    # Extreme raw parameters: an outside element must not see them, not even as NaN gradients.
    _, uw, uh, ud = make(kind, (n,), k, scale=40.0, gen=gen)
    for dtype in (torch.float32, torch.float64):
        x, uw_, uh_, ud_ = on((xs, uw, uh, ud), dtype, device)
        # one ulp beyond each end, in the dtype
        x[:2] = torch.nextafter(x[6:], torch.tensor([-math.inf, math.inf], dtype=dtype, device=device))
        leaves = [t.clone().requires_grad_(True) for t in (x, uw_, uh_, ud_)]
        out, lad = spline(kind, inverse, backend)(*leaves)
        g_out = torch.randn(n, dtype=dtype, generator=gen).to(device)
        grads = torch.autograd.grad((out, lad), leaves, (g_out, torch.randn(n, dtype=dtype, generator=gen).to(device)))
        outside = slice(0, 6)
        assert torch.equal(out[outside], x[outside]) and torch.equal(lad[outside], torch.zeros_like(lad[outside]))
        assert torch.equal(grads[0][outside], g_out[outside])
        for g in grads[1:]:
            assert torch.equal(g[outside], torch.zeros_like(g[outside]))
        assert all(torch.isfinite(g).all() for g in grads) and torch.isfinite(out).all() and torch.isfinite(lad).all()
        # the box's ends map to the other axis' ends
        torch.testing.assert_close(out[6:].double().cpu(), torch.tensor([olo, ohi], dtype=torch.float64),
                                   rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_in_its_element(backend, kind):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(9)
    x, uw, uh, ud = make(kind, (40,), 5, outside=0.0, gen=gen)
    x[3] = float("nan")
    uw[7, 1] = float("nan")  # an inside element's parameter: NaN in that element only
    for dtype in (torch.float32, torch.float64):
        t = [v.clone().requires_grad_(True) for v in on((x, uw, uh, ud), dtype, device)]
        out, lad = spline(kind, False, backend)(*t)
        (out.sum() + lad.sum()).backward()
        bad = torch.zeros(40, dtype=torch.bool)
        bad[3] = bad[7] = True
        assert torch.isnan(out[3]) and torch.isnan(lad[3]) and torch.isnan(out[7])
        assert torch.isfinite(out.cpu()[~bad]).all() and torch.isfinite(lad.cpu()[~bad]).all()
        assert torch.isfinite(t[0].grad.cpu()[~bad]).all() and torch.isfinite(t[1].grad.cpu()[~bad]).all()
        ref = reference(kind)(*(v.detach().double().cpu() for v in t))
        torch.testing.assert_close(out.detach().double().cpu()[~bad], ref[0][~bad], **tolerances(dtype, True))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(backend, kind):
    device = device_for(backend)
    for shape in [(0,), (3, 0), (0, 4)]:
        t = [v.requires_grad_(True) for v in on(make(kind, shape, 4), torch.float32, device)]
        out, lad = spline(kind, False, backend)(*t)
        assert out.shape == shape and lad.shape == shape
        (out.sum() + lad.sum()).backward()
        assert [v.grad.shape for v in t] == [v.shape for v in t]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_parameters(backend, kind):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(10)
    x, uw, uh, ud = on(make(kind, (6, 9), 5, gen=gen), torch.float64, device)
    shared = [p[:1].clone().requires_grad_(True) for p in (uw, uh, ud)]  # (1, 9, K): one set per feature
    out, lad = spline(kind, False, backend)(x, *shared)
    expanded = [p.detach().expand(6, 9, p.shape[-1]).clone().requires_grad_(True) for p in shared]
    out2, lad2 = reference(kind)(x, *expanded)
    (out.sum() + 2 * lad.sum()).backward()
    (out2.sum() + 2 * lad2.sum()).backward()
    _close64((out, lad, *(p.grad for p in shared)), (out2, lad2, *(e.grad.sum(0, keepdim=True) for e in expanded)),
             "broadcast")


# ------------------------------------------------------------------ the peers' own functions, float64


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [3, 10])
def test_matches_nflows_rational_quadratic_spline(backend, inverse, k):
    device = device_for(backend)
    left, right, bottom, top = BOXES["nflows_bounded"]
    mbw, mbh, md = SETTINGS["nflows_bounded"]
    gen = torch.Generator().manual_seed(20 + k)
    base = make("nflows_bounded", (257,), k, inverse, scale=3.0, outside=0.0, gen=gen)  # nflows raises outside
    g_out = torch.randn(257, dtype=torch.float64, generator=gen)
    g_lad = torch.randn(257, dtype=torch.float64, generator=gen)
    ref = outputs_and_grads(nflows_rq.rational_quadratic_spline, base, g_out, g_lad, inverse=inverse, left=left,
                            right=right, bottom=bottom, top=top, min_bin_width=mbw, min_bin_height=mbh,
                            min_derivative=md)
    got = outputs_and_grads(spline("nflows_bounded", inverse, backend), on(base, torch.float64, device),
                            g_out.to(device), g_lad.to(device))
    _close64((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]), "vs nflows")


def _zuko(inverse):
    """zuko's MonotonicRQSTransform as ``f(x, widths, heights, derivatives) -> (out, lad)``."""
    bound, slope = BOXES["zuko"][1], SETTINGS["zuko"][2]

    def f(x, w, h, d):
        t = zuko_transforms.MonotonicRQSTransform(w, h, d, bound=bound, slope=slope)
        if not inverse:
            return t.call_and_ladj(x)
        y = t.inv(x)
        return y, -t.call_and_ladj(y)[1]

    return f


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [3, 10])
def test_matches_zuko_monotonic_rqs(backend, inverse, k):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(30 + k)
    base = make("zuko", (257,), k, inverse, scale=3.0, outside=0.1, gen=gen)  # zuko: the identity outside too
    g_out = torch.randn(257, dtype=torch.float64, generator=gen)
    g_lad = torch.randn(257, dtype=torch.float64, generator=gen)
    ref = outputs_and_grads(_zuko(inverse), base, g_out, g_lad)
    got = outputs_and_grads(spline("zuko", inverse, backend), on(base, torch.float64, device), g_out.to(device),
                            g_lad.to(device))
    _close64((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]), "vs zuko")


# ------------------------------------------------------------------ bad input, routing


def test_bad_input_messages():
    x, uw, uh, ud = make("nflows_bounded", (10,), 4)
    with pytest.raises(ValueError, match=r"rq_spline_bounded: unnormalized_derivatives must have K\+1=5 .*every knot"):
        rq_spline_bounded(x, uw, uh, ud[:, :3])
    with pytest.raises(ValueError, match=r"rq_spline_zuko: derivatives must have K-1=3 .*boundary slopes are 1"):
        rq_spline_zuko(x, uw, uh, ud)
    with pytest.raises(ValueError, match="rq_spline_zuko: heights must have K=4"):
        rq_spline_zuko(x, uw, uh[:, :3], ud[:, :3])
    with pytest.raises(ValueError, match="needs finite left < right and bottom < top"):
        rq_spline_bounded(x, uw, uh, ud, left=1.0, right=0.0)
    with pytest.raises(ValueError, match="needs finite left < right"):
        rq_spline_bounded(x, uw, uh, ud, top=math.inf)
    with pytest.raises(ValueError, match=r"slope must be in \(0, 1\)"):
        rq_spline_zuko(x, uw, uh, ud[:, :3], slope=1.5)
    with pytest.raises(ValueError, match="min_bin_width=0.3 times K=4"):
        rq_spline_bounded(x, uw, uh, ud, min_bin_width=0.3)
    with pytest.raises(TypeError, match="has dtype float32 but inputs has float64"):
        rq_spline_zuko(x, uw.float(), uh, ud[:, :3])


def test_triton_launcher_refuses_what_it_has_no_kernels_for():
    from fastflow.kernels.triton import spline as triton_spline

    x, uw, uh, ud = make("zuko", (4,), 3)
    with pytest.raises(ValueError, match="no kernels for the 'cubic'"):
        triton_spline.forward(x, uw, uh, ud, False, "cubic", BOXES["zuko"], 0.0, 0.0, MIN)
    with pytest.raises(ValueError, match=r"nflows_bounded\): derivatives must be \(N, 4\) for K=3"):
        triton_spline.backward(x, x, x, uw, uh, ud, False, "nflows_bounded", BOXES["zuko"], MIN, MIN, MIN)
    assert triton_spline.PARAMETERIZATIONS == ("nflows", "nflows_bounded", "zuko")


@pytest.mark.skipif(INTERPRET, reason="the CPU routing (the interpreter run checks triton's)")
@pytest.mark.parametrize("kind", KINDS)
def test_forced_backend_without_the_prologue_raises(kind, monkeypatch):
    # what a backend declares (Backend.parameterizations) is what the registry routes by
    x = torch.zeros(3, dtype=torch.float64)
    assert resolve_backend("rq_spline", x, None, parameterization=kind) == "numba"
    monkeypatch.setitem(BACKENDS, "numba", dataclasses.replace(BACKENDS["numba"], parameterizations=("nflows",)))
    assert resolve_backend("rq_spline", x, None, parameterization=kind) == "reference"  # backend=None falls back
    with pytest.raises(BackendUnavailableError, match=f"op: backend 'numba' has no kernels for the '{kind}'"):
        resolve_backend("rq_spline", x, "numba", parameterization=kind, caller="op")
    with pytest.raises(BackendUnavailableError, match=f"no kernels for the '{kind}'"):
        (rq_spline_bounded if kind == "nflows_bounded" else rq_spline_zuko)(*make(kind, (3,), 3), backend="numba")


# triton (with its mark) where it runs, else no case at all (deselected, not skipped)
TRITON = [b for b in ALL_BACKENDS if getattr(b, "values", (b,))[0] == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("kind", KINDS)
def test_backend_none_picks_triton(backend, kind):
    x = torch.zeros(3, dtype=torch.float64, device=device_for(backend))
    assert resolve_backend("rq_spline", x, None, parameterization=kind) == backend
