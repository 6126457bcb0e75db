"""Coupling laws (affine, additive, NICE rescale): every backend against the reference, the
reference against the naive Jacobian log-det, round trips, gradcheck/opcheck, strided halves read
without copies, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch

from fastflow.kernels.reference.coupling import (
    affine_coupling_reference,
    affine_coupling_reference_backward,
    rescale_reference,
    rescale_reference_backward,
)
from fastflow.ops import additive_coupling, affine_coupling, rescale
from fastflow import backends as backends_mod
from fastflow.ops import coupling as coupling_mod
from fastflow.ops._layout import as_3d as _as_3d
from fastflow.testing import assert_close, outputs_and_grads, tolerances
from tests._backends import (ALL_BACKENDS, CPU_BACKENDS, INTERPRET, KERNEL_BACKENDS, device_for, dtypes_for,
                             float32_in_float32)

SCALES = ["exp", "softclamp", "sigmoid"]


def tol(backend, dtype):
    return tolerances(dtype, float32_in_float32(backend, "coupling"))


def small(backend) -> bool:
    return backend in ("triton", "cuda") and INTERPRET


def halves(b, c, hw=(3, 5), dtype=torch.float64, device="cpu", scale=1.0, gen=None):
    """x's second half and the conditioner's interleaved outputs, as a coupling layer slices them."""
    full = torch.randn(b, 2 * c, *hw, dtype=torch.float64, generator=gen).to(dtype=dtype, device=device)
    h = (torch.randn(b, 2 * c, *hw, dtype=torch.float64, generator=gen) * scale).to(dtype=dtype, device=device)
    return full[:, c:], h[:, ::2], h[:, 1::2]


# ------------------------------------------------------------------ backends vs reference


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_affine_backend_matches_reference(backend, inverse, scale):
    device = device_for(backend)
    b = 2**4 + 17 if small(backend) else 2**7 + 17
    for dtype in dtypes_for(backend):
        x, t, h = halves(b, 3, device=device, scale=1.5)
        # Exercise the strided path (interleaved t/h) and the 2-D path (flat vectors).
        for args in ((x, t, h), tuple(v.reshape(b, -1).contiguous() for v in (x, t, h))):
            args = tuple(v.to(dtype) for v in args)
            g_out = torch.randn(args[0].shape, dtype=torch.float64, device=device)
            g_lad = torch.randn(b, dtype=torch.float64, device=device)
            kw = dict(scale=scale, clamp=1.5, inverse=inverse)
            ref = outputs_and_grads(affine_coupling, [v.double() for v in args], g_out, g_lad, backend="reference",
                                    **kw)
            got = outputs_and_grads(affine_coupling, args, g_out, g_lad, backend=backend, **kw)
            assert got[0].dtype == dtype and got[1].dtype == dtype and got[1].shape == (b,)
            assert got[0].is_contiguous()
            tl = tol(backend, dtype)
            assert_close(got[0], ref[0], **tl)
            # The log-det sums F terms: its error grows with F, and with |sum| it is relative to.
            f = args[0][0].numel()
            assert_close(got[1], ref[1], rtol=tl["rtol"], atol=tl["atol"] * f)
            for g, r in zip(got[2], ref[2]):
                assert g.dtype == dtype and g.shape == args[0].shape
                assert_close(g, r, **tl)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_additive_and_rescale_backend_match_reference(backend, inverse):
    device = device_for(backend)
    b = 2**4 + 17 if small(backend) else 2**7 + 17
    for dtype in dtypes_for(backend):
        x, t, _ = halves(b, 3, device=device)
        x, t = x.to(dtype), t.to(dtype)
        g_out = torch.randn(x.shape, dtype=torch.float64, device=device)
        g_lad = torch.randn(b, dtype=torch.float64, device=device)
        ref = outputs_and_grads(additive_coupling, [x.double(), t.double()], g_out, g_lad, inverse=inverse,
                                backend="reference")
        got = outputs_and_grads(additive_coupling, [x, t], g_out, g_lad, inverse=inverse, backend=backend)
        for a, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
            assert a.dtype == dtype
            assert_close(a, r, **tol(backend, dtype))
        for ls_shape in [x.shape[1:], (x.shape[1], 1, 1)]:
            ls = (torch.randn(ls_shape, dtype=torch.float64) * 0.7).to(dtype=dtype, device=device)
            ref = outputs_and_grads(rescale, [x.double(), ls.double()], g_out, g_lad, inverse=inverse,
                                    backend="reference")
            got = outputs_and_grads(rescale, [x, ls], g_out, g_lad, inverse=inverse, backend=backend)
            f = x[0].numel()
            tl = tol(backend, dtype)
            assert_close(got[0], ref[0], **tl)
            assert_close(got[1], ref[1], rtol=tl["rtol"], atol=tl["atol"] * f)
            assert_close(got[2][0], ref[2][0], **tl)
            # grad log_scale sums over the batch (and broadcast dims): relative to its scale.
            scale_ = ref[2][1].abs().max().clamp_min(1.0)
            assert got[2][1].shape == ls.shape
            assert_close(got[2][1] / scale_, ref[2][1] / scale_, rtol=tl["rtol"], atol=tl["atol"] * b)


def test_reference_backward_matches_autograd():
    x, t, h = halves(9, 2, scale=2.0)
    g_out, g_lad = torch.randn(x.shape, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    for scale in SCALES:
        for inverse in (False, True):
            leaves = [v.clone().requires_grad_(True) for v in (x, t, h)]
            out, lad = affine_coupling_reference(*leaves, scale, 1.3, inverse)
            auto = torch.autograd.grad((out, lad), leaves, (g_out, g_lad))
            gx, gh = affine_coupling_reference_backward(g_out, g_lad, x, t, h, scale, 1.3, inverse)
            torch.testing.assert_close(gx, auto[0])
            torch.testing.assert_close(gh, auto[2])
            torch.testing.assert_close(-gx if inverse else g_out, auto[1])
    ls = torch.randn(x.shape[1:], dtype=torch.float64, requires_grad=True)
    for inverse in (False, True):
        out, lad = rescale_reference(x, ls, inverse)
        auto = torch.autograd.grad((out, lad), ls, (g_out, g_lad))[0]
        torch.testing.assert_close(rescale_reference_backward(g_out, g_lad, x, ls.detach(), inverse)[1], auto)


# ------------------------------------------------------------------ maths


# ------------------------------------------------------------------ layouts: no copies


def _spy(monkeypatch, backend, fn_name):
    """Record the tensors the backend adapter receives."""
    kern = coupling_mod.get_kernel("affine_coupling", backend)
    seen = []
    real = getattr(kern, fn_name)

    def spy(*args, **kw):
        seen.append([a for a in args if isinstance(a, torch.Tensor)])
        return real(*args, **kw)

    monkeypatch.setattr(kern, fn_name, spy)
    return seen


def test_views_of_halves_are_not_copies():
    img = torch.randn(5, 8, 4, 6)
    h = torch.randn(5, 8, 4, 6)
    vec, hv = torch.randn(7, 10), torch.randn(7, 10)
    cases = [
        [img[:, :4], h[:, ::2], h[:, 1::2]],  # channel half, interleaved conditioner outputs
        [img[:, 4:], *h.chunk(2, dim=1)],  # chunked halves
        [vec[:, :5], hv[:, ::2], hv[:, 1::2]],  # vectors
        [img[:, :4], h[:, :4], torch.ones(1, 1, 1, 1).expand(5, 4, 4, 6)],  # an expanded gradient
    ]
    for tensors in cases:
        views = _as_3d(tensors)
        for v, t in zip(views, tensors):
            assert v.dim() == 3 and v.shape[0] == t.shape[0] and v[0].numel() == t[0].numel()
            assert v.data_ptr() == t.data_ptr() and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            torch.testing.assert_close(v.reshape(t.shape), t, rtol=0, atol=0)
    # A layout no (B, M, N) view expresses (channels-last halves) is copied: still correct.
    cl = torch.randn(5, 8, 4, 6).to(memory_format=torch.channels_last)[:, ::2]
    views = _as_3d([img[:, :4], cl, h[:, 1::2]])
    torch.testing.assert_close(views[1].reshape(cl.shape), cl, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_halves_reach_the_kernel_uncopied(backend, monkeypatch):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    x, t, h = halves(6, 3, dtype=dtype, device=device)
    assert not x.is_contiguous() and not t.is_contiguous()
    fwd = _spy(monkeypatch, backend, "affine_fwd")
    bwd = _spy(monkeypatch, backend, "affine_bwd")
    leaves = [v.detach().requires_grad_(True) for v in (x, t, h)]
    y, lad = affine_coupling(*leaves, backend=backend)
    (y * y).sum().backward()
    ptrs = {v.data_ptr() for v in (x, t, h)}
    assert {a.data_ptr() for a in fwd[0][:3]} == ptrs
    assert {a.data_ptr() for a in bwd[0][2:5]} == ptrs
    ref = affine_coupling_reference(x.double(), t.double(), h.double())
    assert_close(y, ref[0], **tol(backend, dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_layouts(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    base = torch.randn(7, 6, 4, 5, dtype=dtype, device=device)
    cases = [
        (base.transpose(2, 3), torch.randn(7, 6, 5, 4, dtype=dtype, device=device), base.transpose(2, 3) * 0.3),
        (base.to(memory_format=torch.channels_last)[:, ::2],) * 3,
        (base[::2, :, 1:3, ::2],) * 3,
    ]
    for x, t, h in cases:
        g = torch.randn(x.shape, dtype=torch.float64, device=device)
        gl = torch.randn(x.shape[0], dtype=torch.float64, device=device)
        for inverse in (False, True):
            got = outputs_and_grads(affine_coupling, (x, t, h), g, gl, inverse=inverse, backend=backend)
            ref = outputs_and_grads(affine_coupling, [v.double().contiguous() for v in (x, t, h)], g, gl,
                                    inverse=inverse,
                           backend="reference")
            for a, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
                assert_close(a, r, **tol(backend, dtype))
        ls = h[0] * 0.5
        got = outputs_and_grads(rescale, (x, ls), g, gl, backend=backend)
        ref = outputs_and_grads(rescale, (x.double().contiguous(), ls.double().contiguous()), g, gl,
                                backend="reference")
        for a, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
            s_ = r.abs().max().clamp_min(1.0)
            assert_close(a / s_, r / s_, **tol(backend, dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_broadcast_output_gradients(backend, monkeypatch):
    """Output gradients expanded from a scalar (what ``y.sum()`` hands back: all strides 0) or
    from one sample (batch stride 0) give the gradients of the same values materialised, in
    every law and direction; the kernel receives the expanded tensor as it is (the numba
    kernels read a scalar gradient in place)."""
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    x, t, h = halves(2**3 + 5 if small(backend) else 2**6 + 5, 3, dtype=dtype, device=device)
    seen = _spy(monkeypatch, backend, "affine_bwd")
    b = x.shape[0]
    grads = [
        (torch.full((), 0.7, dtype=dtype, device=device).expand(x.shape),
         torch.full((), -1.3, dtype=dtype, device=device).expand(b)),
        (torch.randn(x.shape[1:], dtype=dtype, device=device).expand(x.shape),
         torch.randn(b, dtype=dtype, device=device)),
    ]
    for g, gl in grads:
        for scale in SCALES:
            for inverse in (False, True):
                kw = dict(scale=scale, inverse=inverse)
                got = outputs_and_grads(affine_coupling, (x, t, h), g, gl, backend=backend, **kw)
                dense = outputs_and_grads(affine_coupling, (x, t, h), g.contiguous(), gl.contiguous(), backend=backend,
                                          **kw)
                ref = outputs_and_grads(affine_coupling, [v.double() for v in (x, t, h)], g.double().contiguous(),
                                        gl.double().contiguous(), backend="reference", **kw)
                for a, d, r in zip(got[2], dense[2], ref[2]):
                    assert_close(a, d, rtol=0, atol=0)
                    assert_close(a, r, **tol(backend, dtype))
                assert any(all(s == 0 for s in call[0].stride()) for call in seen)


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_extreme_raw_scales(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    big = 1e3 if dtype == torch.float64 else 1e2  # past exp's overflow in each dtype
    h = torch.tensor([[-1e30, -big, -30.0, -2.0001, -2.0, 0.0, 1.99, 2.0, 3.0, 30.0, big, 1e30]], dtype=dtype,
                     device=device)
    n = h.shape[1]
    x = torch.linspace(-2, 2, n, dtype=dtype, device=device)[None].add(0.01)  # no zeros
    t = torch.full_like(x, 0.5)
    for scale in SCALES:
        y, lad = affine_coupling(x, t, h, scale=scale, clamp=2.0, backend=backend)
        ref = affine_coupling_reference(x.double(), t.double(), h.double(), scale, 2.0)
        tl = tol(backend, dtype)
        finite = torch.isfinite(ref[0].to(dtype))
        assert torch.equal(torch.isfinite(y), finite), scale
        assert_close(y[finite], ref[0][finite], **tl)
        if scale == "exp":
            # Documented: exp overflows to inf (with the sign of x) past ~88.7 (float32) / ~709.8
            # (float64); the log-det is the exact sum of h.
            assert torch.isinf(y[0, -2:]).all() and (torch.sign(y[0, -2:]) == torch.sign(x[0, -2:])).all()
            assert torch.isinf(y[0, -1])
            # ... and the inverse of a huge scale is (y - t) * exp(-h): 0 or a subnormal.
            xi, _ = affine_coupling(x, t, h, scale=scale, inverse=True, backend=backend)
            ref_i = affine_coupling_reference(x.double(), t.double(), h.double(), scale, 2.0, True)[0]
            assert (xi[0, -2:].abs() <= 1e-30).all()
            fin = torch.isfinite(ref_i.to(dtype))
            assert torch.equal(torch.isfinite(xi), fin)
            assert_close(xi[fin], ref_i[fin], **tl)
        else:
            # softclamp and sigmoid keep log s finite (|log s| <= clamp, log s <= 0), and
            # softclamp's s and 1/s are finite too.
            assert torch.isfinite(lad).all()
            assert_close(lad, ref[1], rtol=tl["rtol"], atol=tl["atol"] * n)
            if scale == "softclamp":
                assert torch.isfinite(y).all()
                xi, lad_i = affine_coupling(y, t, h, scale=scale, inverse=True, backend=backend)
                assert torch.isfinite(xi).all()
                assert_close(xi, x, rtol=tl["rtol"] * 10, atol=tl["atol"] * 10)
                # The soft clamp saturates: |log s| approaches, and never exceeds, the clamp.
                logs = torch.log((y - t) / x)
                assert (logs.abs() <= 2.0 + 1e-5).all()
        # Gradients: finite wherever the law is (softclamp everywhere).
        leaves = [v.clone().requires_grad_(True) for v in (x, t, h)]
        y, lad = affine_coupling(*leaves, scale=scale, clamp=2.0, backend=backend)
        (y.sum() + lad.sum()).backward()
        if scale == "softclamp":
            assert all(torch.isfinite(v.grad).all() for v in leaves)
        ok = torch.isfinite(ref[0])[0] & (h[0].abs() < 50)
        gref = affine_coupling_reference_backward(torch.ones_like(ref[0]), torch.ones(1, dtype=torch.float64,
                                                  device=device), x.double(), t.double(), h.double(), scale, 2.0)
        assert_close(leaves[0].grad[0, ok], gref[0][0, ok], **tl)
        assert_close(leaves[2].grad[0, ok], gref[1][0, ok], **tl)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_stays_in_its_sample(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend in CPU_BACKENDS else torch.float32
    x, t, h = (v.contiguous() for v in halves(8, 2, dtype=dtype, device=device))
    x[1, 0, 1, 2] = float("nan")
    t[2, 1, 0, 0] = float("nan")
    h[5, 1, 2, 4] = float("nan")
    for scale in SCALES:
        for inverse in (False, True):
            leaves = [v.clone().requires_grad_(True) for v in (x, t, h)]
            y, lad = affine_coupling(*leaves, scale=scale, inverse=inverse, backend=backend)
            nan_y = torch.isnan(y)
            assert nan_y.sum() == 3 and nan_y[1, 0, 1, 2] and nan_y[2, 1, 0, 0] and nan_y[5, 1, 2, 4]
            assert torch.isnan(lad).tolist() == [i == 5 for i in range(8)]
            (y.nan_to_num().sum() + lad.nan_to_num().sum()).backward()
            clean = [0, 3, 4, 6, 7]
            for v in leaves:
                assert torch.isfinite(v.grad[clean]).all()
    ls = torch.randn(x.shape[1:], dtype=dtype, device=device)
    y, lad = rescale(x, ls, backend=backend)
    assert torch.isnan(y).sum() == 1 and torch.isfinite(lad).all()


# ------------------------------------------------------------------ bad input and dispatch


def test_half_precision_on_cpu_uses_reference():
    x, t, h = halves(6, 2)
    for dtype in (torch.float16, torch.bfloat16):
        y, lad = affine_coupling(x.to(dtype), t.to(dtype), h.to(dtype), scale="sigmoid")
        ref = affine_coupling_reference(*(v.to(dtype).double() for v in (x, t, h)), "sigmoid")
        assert y.dtype == dtype
        assert_close(y, ref[0])
        assert_close(lad, ref[1], atol=tolerances(dtype)["atol"] * x[0].numel())


def test_numba_bitwise_reproducible_across_thread_counts():
    numba = pytest.importorskip("numba")
    x, t, h = (v.float() for v in halves(2**9 + 17, 4, hw=(4, 4)))
    ls = torch.randn(x.shape[1:])
    g, gl = torch.randn(x.shape), torch.randn(x.shape[0])
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            for scale in SCALES:
                got = outputs_and_grads(affine_coupling, (x, t, h), g, gl, scale=scale, backend="numba")
                results.append((threads, got))
            results.append((threads, outputs_and_grads(rescale, (x, ls), g, gl, backend="numba")))
    finally:
        numba.set_num_threads(before)
    per = len(SCALES) + 1
    for (_, a), (_, b) in zip(results[:per], results[-per:]):
        for u, v in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
            assert torch.equal(u, v)


@pytest.mark.parametrize("inverse", [False, True])
def test_numba_interleaved_params_read_as_pairs(inverse, monkeypatch):
    """A coupling layer's ``params[..., 0]``/``params[..., 1]`` (float32, one buffer) are read
    by the numba kernels as 64-bit pairs: outputs and gradients must be bitwise those of the
    same values passed as separate contiguous tensors, and the pair path must really be taken."""
    pytest.importorskip("numba")
    from fastflow.kernels.numba import coupling as nbc

    taken = []
    real = nbc._pairs
    monkeypatch.setattr(nbc, "_pairs", lambda s, r: taken.append(real(s, r)[0].size > 0) or real(s, r))

    def run(x, params, g, gl, split, **kw):
        x, params = x.clone().requires_grad_(True), params.clone().requires_grad_(True)
        y, lad = affine_coupling(x, *split(params), inverse=inverse, backend="numba", **kw)
        return (y, lad, *torch.autograd.grad((y, lad), (x, params), (g, gl)))

    in_place = lambda p: (p[..., 0], p[..., 1])  # noqa: E731
    every_other = lambda p: (p[:, ::2, ..., 0], p[:, ::2, ..., 1])  # noqa: E731  (a per-run pair layout)
    gen = torch.Generator().manual_seed(3)
    for shape in [(37, 24), (5, 3, 4, 6), (1, 1)]:
        x = torch.randn(shape, generator=gen)
        g, gl = torch.randn(shape, generator=gen), torch.randn(shape[0], generator=gen)
        params = torch.randn(*shape, 2, generator=gen)
        wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], 2, generator=gen)
        for scale in SCALES:
            for p, split in ((params, in_place), (wide, every_other)):
                a = run(x, p, g, gl, split, scale=scale)
                b = run(x, p, g, gl, lambda q, split=split: [v.contiguous() for v in split(q)], scale=scale)
                for u, v in zip(a, b):
                    assert torch.equal(u, v), (shape, scale)
    assert any(taken) and not all(taken)


def test_numba_single_task_launch_runs_the_serial_twin():
    """A kernel with one parallel task runs its serial twin (the same function compiled without
    ``parallel``: no parallel region, no pool wake-up) with the same results; the caller's thread
    count is untouched, and multi-task kernels keep the pool."""
    import numba
    import numpy as np

    from fastflow.kernels.numba._threads import _TWINS, launch

    @numba.njit(parallel=True)
    def team(a, out):
        for i in numba.prange(a.shape[0]):
            out[i] = 2.0 * a[i] + 1.0

    before = numba.get_num_threads()
    a, out = np.arange(4.0), np.zeros(4)
    launch(team, 1, a, out)
    assert (out == 2.0 * a + 1.0).all() and numba.get_num_threads() == before
    twin = _TWINS[team]
    assert twin is not team and not twin.targetoptions.get("parallel")
    assert twin.py_func.__qualname__.endswith("_serial")
    out[:] = 0
    launch(team, 4, a, out)
    assert (out == 2.0 * a + 1.0).all() and team.signatures  # the parallel kernel itself ran


@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
@pytest.mark.parametrize("inverse", [False, True])
def test_small_cpu_batches_take_torch_ops(monkeypatch, scale, inverse):
    """backend=None on a small CPU batch evaluates the law with torch ops (cheaper than a kernel
    launch there): the same values and gradients as the fused kernel and the float64 oracle;
    larger batches and a forced backend go to the kernel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, 3, 2, generator=g)
    params = 1.5 * torch.randn(16, 6, 3, 2, 2, generator=g)

    def run(backend, xx=x, pp=params):
        xi, pi = xx.clone().requires_grad_(), pp.clone().requires_grad_()
        y, lad = affine_coupling(xi[:, 1:5], pi[:, 1:5, ..., 0], pi[:, 1:5, ..., 1], scale=scale, clamp=1.5,
                                 inverse=inverse, backend=backend)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype)
        torch.autograd.backward((y, lad), (gy, torch.ones_like(lad)))
        return y, lad, xi.grad, pi.grad

    small = run(None)
    assert small[0].grad_fn is None or "Function" not in type(small[0].grad_fn).__name__
    fused = run("numba")
    oracle = run("reference", x.double(), params.double())
    for a, b, c in zip(small, fused, oracle):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a.double(), c, rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        y, _ = additive_coupling(x, params[..., 0], inverse=inverse)
        torch.testing.assert_close(y, x - params[..., 0] if inverse else x + params[..., 0], rtol=0, atol=0)
    for empty in (x[:0], x[:, :0]):  # empty batch / event: the op's defined results, no reshape errors
        y, lad = affine_coupling(empty, empty, empty, scale=scale, inverse=inverse)
        assert y.shape == empty.shape and torch.equal(lad, torch.zeros(empty.shape[0]))
    xh = x.half().requires_grad_()  # half precision keeps the op (float32 compute)
    assert "AffineCouplingFunction" in type(affine_coupling(xh, xh, xh, scale=scale)[0].grad_fn).__name__
    monkeypatch.setenv("FASTFLOW_BACKEND", "numba")  # forcing still reaches the kernel
    xi = x.clone().requires_grad_()
    assert "AffineCouplingFunction" in type(affine_coupling(xi, x, x, scale=scale)[0].grad_fn).__name__
    monkeypatch.delenv("FASTFLOW_BACKEND")
    monkeypatch.setattr(backends_mod, "SMALL_CPU_ELEMS", 10)  # above the threshold: the kernel
    assert "AffineCouplingFunction" in type(affine_coupling(xi, x, x, scale=scale)[0].grad_fn).__name__


@pytest.mark.parametrize("inverse", [False, True])
def test_cpu_additive_and_rescale_take_torch_ops_at_any_size(monkeypatch, inverse):
    """With backend=None on the CPU, the additive law and rescale (one elementwise pass, nothing
    to fuse) are torch ops at any size, beyond the small-batch bound too: values and gradients
    equal to the numba kernel's and the float64 oracle's; the log-det is a real (B,) tensor
    (it can be written in place); a forced backend or FASTFLOW_BACKEND reaches the kernel."""
    monkeypatch.setattr(backends_mod, "SMALL_CPU_ELEMS", 10)  # the inputs below are "large"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, 3, 2, generator=g)
    params = torch.randn(16, 6, 3, 2, 2, generator=g)
    ls = torch.randn(3, 1, 1, generator=g)  # one scale per channel of the half, broadcast
    gy = torch.randn(16, 3, 3, 2, generator=g)
    gl = torch.randn(16, generator=g)

    def run(backend, dtype=torch.float32):
        xi, pi, li = (v.to(dtype).clone().requires_grad_() for v in (x, params, ls))
        out = []
        for fn, args in ((additive_coupling, (xi[:, 1:4], pi[:, 1:4, ..., 0])), (rescale, (xi[:, 1:4], li))):
            y, lad = fn(*args, inverse=inverse, backend=backend)
            out.append((y, lad))
            if lad.requires_grad:
                torch.autograd.backward((y, lad), (gy.to(dtype), gl.to(dtype)))
            else:  # the additive law's log-det is a constant 0
                assert fn is additive_coupling and not lad.any()
                y.backward(gy.to(dtype))
        return out, (xi.grad, pi.grad, li.grad)

    plain, plain_grads = run(None)
    for y, lad in plain:
        assert "Function" not in type(y.grad_fn).__name__, type(y.grad_fn)
        assert lad.shape == (16,) and lad.is_contiguous()
    fused, fused_grads = run("numba")
    oracle, oracle_grads = run("reference", torch.float64)
    for (a, la), (b, lb), (c, lc) in zip(plain, fused, oracle):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(la, lb, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(a.double(), c, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(la.double(), lc, rtol=2e-6, atol=2e-6)
    for a, b, c in zip(plain_grads, fused_grads, oracle_grads):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a.double(), c, rtol=2e-5, atol=2e-5)
    _, lad = rescale(x, torch.randn(6, 3, 2), inverse=inverse)
    lad += 1.0  # a (B,) tensor of its own, not an expanded view
    monkeypatch.setenv("FASTFLOW_BACKEND", "numba")
    xi = x.clone().requires_grad_()
    assert "Function" in type(additive_coupling(xi, x)[0].grad_fn).__name__
    assert "Function" in type(rescale(xi, torch.randn(6, 1, 1))[0].grad_fn).__name__


@pytest.mark.parametrize("inverse", [False, True])
def test_numba_float32_softclamp_with_a_clamp_past_float32_range(inverse, monkeypatch):
    """The float32 softclamp law uses a bounded exp, exact for |log s| <= 87; a larger clamp
    (scales up to e^clamp, past float32's ~e^88.7) takes the float64 arithmetic: values,
    overflow to inf, log-dets and gradients as the float64 reference gives them, rounded."""
    from fastflow.kernels.numba import coupling as nbc

    picked = []
    real = nbc._arithmetic
    monkeypatch.setattr(nbc, "_arithmetic", lambda *a: picked.append(real(*a)) or picked[-1])
    g = torch.Generator().manual_seed(11)
    x = torch.randn(33, 12, generator=g)
    t = torch.randn(33, 12, generator=g)
    h = torch.randn(33, 12, generator=g) * 120.0  # log s reaches +-clamp
    for clamp in (2.0, 87.0, 100.0):
        gy, gl = torch.randn(33, 12, generator=g), torch.randn(33, generator=g)
        got = outputs_and_grads(affine_coupling, (x, t, h), gy, gl, scale="softclamp", clamp=clamp,
                                inverse=inverse, backend="numba")
        ref = outputs_and_grads(affine_coupling, (x.double(), t.double(), h.double()), gy.double(), gl.double(),
                                scale="softclamp", clamp=clamp, inverse=inverse, backend="reference")
        for a, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
            r32 = r.float()
            assert torch.equal(torch.isfinite(a), torch.isfinite(r32)), clamp
            fin = torch.isfinite(r32)
            scale_ = r32[fin].abs().max().clamp_min(1.0)
            assert_close(a[fin] / scale_, r32[fin] / scale_, **tolerances(torch.float32))
        fwd_kernel = picked[-2]
        assert (fwd_kernel is nbc._affine_fwd_kernel) == (clamp > nbc.SOFTCLAMP32_MAX), clamp
        if clamp == 100.0 and not inverse:
            assert not torch.isfinite(got[0]).all()  # s = e^100 overflows float32, as in the reference

