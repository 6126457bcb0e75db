"""LU 1x1 convolution / linear and fused ActNorm+1x1: every backend against the reference, the
reference against dense math (W assembled densely, slogdet, solve), round trips, the naive Jacobian
log-det, gradcheck/opcheck, compile, edge and ill-conditioned cases, the inverse cache, bad input."""

from __future__ import annotations

import pytest
import torch

from fastflow.ops import actnorm_conv1x1, lu_conv1x1, lu_linear
from fastflow.ops import lu as lu_mod
from fastflow.testing import tolerances
from tests._backends import backend_name, backends_for, device_for, dtypes_for

# every backend with LU kernels (its declared ops) but the oracle
LU_KERNEL_BACKENDS = [b for b in backends_for("lu_conv1x1") if backend_name(b) != "reference"]
ALL = ["reference"] + LU_KERNEL_BACKENDS
OPS = ["lu_linear", "lu_conv1x1", "actnorm_conv1x1"]


def name_of(backend):
    return getattr(backend, "values", (backend,))[0]


def make_params(c, dtype=torch.float64, device="cpu", scale=0.3, gen=None):
    """Factors of a moderately conditioned W, at the scale a trained Glow has."""
    g = gen or torch.Generator().manual_seed(c)
    perm = torch.randperm(c, generator=g)
    lower = torch.randn(c, c, generator=g, dtype=torch.float64) * scale
    upper = torch.randn(c, c, generator=g, dtype=torch.float64) * scale
    log_s = torch.randn(c, generator=g, dtype=torch.float64) * scale
    sign = torch.where(torch.rand(c, generator=g) > 0.5, 1.0, -1.0).double()
    an_b = torch.randn(c, generator=g, dtype=torch.float64) * scale
    an_ls = torch.randn(c, generator=g, dtype=torch.float64) * scale
    f = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return {"an_bias": f(an_b), "an_logscale": f(an_ls), "perm": perm.to(device), "lower": f(lower),
            "upper": f(upper), "log_s": f(log_s), "sign": f(sign)}


def x_shape(op, b, c, h=3, w=5):
    return (b, c) if op == "lu_linear" else (b, c, h, w)


def call(op, x, p, inverse=False, backend=None):
    lu = (p["perm"], p["lower"], p["upper"], p["log_s"], p["sign"])
    if op == "lu_linear":
        return lu_linear(x, *lu, inverse=inverse, backend=backend)
    if op == "lu_conv1x1":
        return lu_conv1x1(x, *lu, inverse=inverse, backend=backend)
    return actnorm_conv1x1(x, p["an_bias"], p["an_logscale"], *lu, inverse=inverse, backend=backend)


def grad_names(op):
    return (["an_bias", "an_logscale"] if op == "actnorm_conv1x1" else []) + ["lower", "upper", "log_s"]


def dense(op, x, p, inverse=False):
    """The math, densely: W = P L M assembled from scratch, y = W x per pixel, slogdet(W)."""
    c = p["lower"].shape[0]
    dt = p["lower"].dtype
    eye = torch.eye(c, dtype=dt, device=x.device)
    pm = eye[p["perm"]]
    lo = torch.tril(p["lower"], -1) + eye
    m = torch.triu(p["upper"], 1) + torch.diag(p["sign"] * torch.exp(p["log_s"]))
    w = pm @ lo @ m
    n = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    lad = torch.linalg.slogdet(w)[1] * n
    an = op == "actnorm_conv1x1"
    if an:
        lad = lad + n * p["an_logscale"].sum()
    bc = lambda v: v[:, None, None] if x.dim() == 4 else v  # noqa: E731
    xc = x.movedim(1, -1)  # (..., C): rows are pixels
    if not inverse:
        if an:
            x = torch.exp(bc(p["an_logscale"])) * (x + bc(p["an_bias"]))
            xc = x.movedim(1, -1)
        y = (xc @ w.T).movedim(-1, 1)
    else:
        y = torch.linalg.solve(w, xc.reshape(-1, c).T).T.reshape(xc.shape).movedim(-1, 1)
        if an:
            y = y * torch.exp(-bc(p["an_logscale"])) - bc(p["an_bias"])
        lad = -lad
    return y, lad.expand(x.shape[0]), w


def with_grads(op, x, p, g_y, g_lad, **kw):
    x = x.detach().clone().requires_grad_(True)
    q = {k: (v.detach().clone().requires_grad_(k in grad_names(op)) if v.is_floating_point() else v)
         for k, v in p.items()}
    y, lad = call(op, x, q, **kw)
    leaves = [x] + [q[k] for k in grad_names(op)]
    grads = torch.autograd.grad((y, lad), leaves, (g_y.to(y.dtype), g_lad.to(lad.dtype)))
    return y.detach(), lad.detach(), grads


# ------------------------------------------------------------------ the reference against the math


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("b,c", [(2, 7), (9, 6), (5, 33)])  # B*N < C (factored path) and >= C (assembled)
def test_reference_matches_dense_math(op, inverse, b, c):
    p = make_params(c)
    x = torch.randn(x_shape(op, b, c), dtype=torch.float64)
    y, lad = call(op, x, p, inverse=inverse, backend="reference")
    ye, lade, _ = dense(op, x, p, inverse)
    torch.testing.assert_close(y, ye, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, lade, rtol=1e-10, atol=1e-10)
    assert y.shape == x.shape and lad.shape == (b,) and y.is_contiguous()
    # Gradients against autograd through the dense math.
    g_y, g_lad = torch.randn_like(x), torch.randn(b, dtype=torch.float64)
    got = with_grads(op, x, p, g_y, g_lad, inverse=inverse, backend="reference")
    q = {k: (v.clone().requires_grad_(k in grad_names(op)) if v.is_floating_point() else v) for k, v in p.items()}
    x2 = x.clone().requires_grad_(True)
    ye, lade, _ = dense(op, x2, q, inverse)
    exp = torch.autograd.grad((ye, lade), [x2] + [q[k] for k in grad_names(op)], (g_y, g_lad))
    for name, g, e in zip(["x"] + grad_names(op), got[2], exp):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_perm_convention():
    # With L = U = 0 and log_s = 0, W = P = I[perm]: output channel i is input channel perm[i].
    c = 6
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    z, one = torch.zeros(c, c), torch.ones(c)
    x = torch.randn(4, c)
    y, lad = lu_linear(x, perm, z, z, torch.zeros(c), one, backend="reference")
    assert torch.equal(y, x[:, perm]) and torch.equal(lad, torch.zeros(4))
    xi = torch.randn(2, c, 3, 2)
    y, _ = lu_conv1x1(xi, perm, z, z, torch.zeros(c), one)
    assert torch.equal(y, xi[:, perm])
    # Only the strict triangles are read: junk on/above (below) the diagonal of lower (upper) is ignored.
    p = make_params(c, torch.float32)
    junk_l = p["lower"] + torch.triu(torch.randn(c, c) * 100)
    junk_u = p["upper"] + torch.tril(torch.randn(c, c) * 100)
    y1, _ = lu_linear(x, p["perm"], p["lower"], p["upper"], p["log_s"], p["sign"])
    y2, _ = lu_linear(x, p["perm"], junk_l, junk_u, p["log_s"], p["sign"])
    torch.testing.assert_close(y1, y2)


# ------------------------------------------------------------------ backends against the reference


@pytest.mark.parametrize("backend", LU_KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("c", [3, 20])
def test_backend_matches_reference(backend, op, inverse, c):
    device = device_for(backend)
    for dtype in dtypes_for(backend):
        p = make_params(c, dtype, device)
        x = torch.randn(x_shape(op, 5, c, 3, 7), device=device).to(dtype)
        g_y = torch.randn(x.shape, dtype=torch.float64, device=device).to(dtype)
        g_lad = torch.randn(5, dtype=torch.float64, device=device).to(dtype)
        # Oracle: the reference in float64 on the same (rounded) inputs.
        ref = with_grads(op, x.double(), {k: v.double() if v.is_floating_point() else v for k, v in p.items()},
                         g_y.double(), g_lad.double(), inverse=inverse, backend="reference")
        got = with_grads(op, x, p, g_y, g_lad, inverse=inverse, backend=backend)
        rtol, atol = tolerances(dtype, computed_in_float32=True).values()
        assert got[0].dtype == dtype and got[1].dtype == dtype
        for what, g, r in [("y", got[0], ref[0]), ("logabsdet", got[1], ref[1])] + [
            (f"grad {n}", g, r) for n, g, r in zip(["x"] + grad_names(op), got[2], ref[2])
        ]:
            assert g.dtype == dtype and g.shape == r.shape, what
            # Relative to the tensor's scale: parameter gradients sum over every pixel.
            scale = r.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.double() / scale, r / scale, rtol=rtol, atol=atol,
                                       msg=lambda m, what=what: f"{what} ({dtype}): {m}")


# ------------------------------------------------------------------ maths


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("backend", ALL)
def test_odd_and_non_contiguous(backend):
    device = device_for(backend)
    c = 2**3 + 3
    p = make_params(c, torch.float32, device)
    pd = {k: v.double() if v.is_floating_point() else v for k, v in p.items()}
    tol = tolerances(torch.float32, computed_in_float32=True)
    base = torch.randn(5, 2 * c, 2**4 + 1, 3, device=device)
    views = [
        base[:, ::2],  # strided channels
        base[:, :c].permute(0, 1, 3, 2),  # transposed spatial dims
        base[:, :c].contiguous(memory_format=torch.channels_last),
    ]
    for op in ("lu_conv1x1", "actnorm_conv1x1"):
        for x in views:
            assert not x.is_contiguous()
            for inverse in (False, True):
                y, lad = call(op, x, p, inverse=inverse, backend=backend)
                ye, lade = call(op, x.contiguous().double(), pd, inverse=inverse, backend="reference")
                torch.testing.assert_close(y.double(), ye, **tol)
                torch.testing.assert_close(lad.double(), lade, **tol)
    x = torch.randn(c, 37, device=device).t()  # (37, C) transposed
    q = dict(p, lower=p["lower"].t().contiguous().t(), upper=p["upper"].t().contiguous().t())  # strided params
    assert not q["lower"].is_contiguous()
    y, _ = call("lu_linear", x, q, backend=backend)
    ye, _ = call("lu_linear", x.contiguous().double(), pd, backend="reference")
    torch.testing.assert_close(y.double(), ye, **tol)


# ------------------------------------------------------------------ numerically hard cases


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", ["nearly_singular", "log_s_pm10", "large_lu"])
def test_ill_conditioned(backend, case):
    """Stated behaviour: the forward is exact up to the GEMM's round-off, the log-det is exactly
    ``N*sum(log_s)`` whatever the conditioning, everything stays finite, and the inverse's error
    relative to ||x|| is at most a small multiple of cond(W) * eps (the explicit ``W^-1`` used for
    many pixels is not backward stable; the triangular solves used for few pixels are)."""
    device = device_for(backend)
    dtype = torch.float64 if name_of(backend) == "reference" else torch.float32
    c = 12
    p = make_params(c, torch.float64, device)
    if case == "nearly_singular":
        p["log_s"][3] = -10.0
    elif case == "log_s_pm10":
        p["log_s"][0] = 10.0
        p["log_s"][5] = -10.0
    else:
        p["lower"] = p["lower"] / 0.3 * 5.0
        p["upper"] = p["upper"] / 0.3 * 5.0
    _, _, w = dense("lu_conv1x1", torch.zeros(1, c, 1, 1, dtype=torch.float64, device=device), p)
    cond = float(torch.linalg.cond(w))
    assert cond > 1e4, "the case lost its point"
    eps = torch.finfo(dtype).eps
    q = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
    qd = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in p.items()}  # rounded, in float64
    for op in ("lu_conv1x1", "actnorm_conv1x1"):
        for b, hw in ((4, 3), (1, 1)):  # assembled (explicit W, W^-1) and factored (B*N < C) paths
            x = torch.randn(b, c, hw, hw, dtype=torch.float64, device=device).to(dtype)
            y, lad = call(op, x, q, backend=backend)
            ye, lade, _ = dense(op, x.double(), qd)
            assert torch.isfinite(y).all() and torch.isfinite(lad).all()
            # Forward: per-entry error below C * eps * (|W| |x|), the GEMM's round-off bound.
            xa = x.double()
            if op == "actnorm_conv1x1":
                xa = torch.exp(qd["an_logscale"])[:, None, None] * (xa + qd["an_bias"][:, None, None])
            bound = torch.einsum("ij,bjhw->bihw", w.abs(), xa.abs()) * 4 * c * eps
            assert bool(((y.double() - ye).abs() <= bound).all()), f"{op} forward beyond round-off"
            # Inverse (round trip through the op): finite, error within cond(W) * eps.
            x2, lad2 = call(op, y, q, inverse=True, backend=backend)
            assert torch.isfinite(x2).all()
            err = float((x2.double() - x.double()).norm() / x.double().norm())
            bound = 10 * c * cond * eps
            assert err <= bound, f"{op} inverse error {err:.3g} > 10 C cond eps ({bound:.3g})"
            torch.testing.assert_close(lad2, -lad)
            n = hw * hw
            # The log-det is det(P L M) = prod(diag M) exactly, whatever the conditioning (a dense
            # slogdet of the assembled W need not be).
            exact = n * (qd["log_s"].sum() + (qd["an_logscale"].sum() if op == "actnorm_conv1x1" else 0.0))
            torch.testing.assert_close(lad.double(), exact.expand(b), rtol=4 * c * eps, atol=4 * c * eps)
            if case == "nearly_singular":  # here W is still well-represented: slogdet agrees
                torch.testing.assert_close(lad.double(), lade, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the inverse cache


def test_inverse_cache_invalidated_by_optimizer_step():
    lu_mod.clear_inverse_cache()
    c = 8
    p = make_params(c, torch.float32)
    params = [p[k].requires_grad_(True) for k in ("lower", "upper", "log_s")]
    y = torch.randn(16, c)

    def inv():
        # the torch backend caches W^-1 (the numba path, at this width, recomputes it: microseconds)
        return lu_linear(y, p["perm"], p["lower"], p["upper"], p["log_s"], p["sign"], inverse=True,
                         backend="torch")[0]

    def oracle():
        pd = {k: v.detach().double() if v.is_floating_point() else v for k, v in p.items()}
        return dense("lu_linear", y.double(), pd, inverse=True)[0]

    from fastflow.kernels.torch.lu import INVERSE_CACHE_STATS as stats

    x1 = inv()
    h0, m0 = stats["hits"], stats["misses"]
    x1b = inv()
    assert stats["hits"] == h0 + 1 and stats["misses"] == m0, "unchanged factors must hit the cache"
    assert torch.equal(x1, x1b)
    # One optimizer step changes every factor in place (version bump, same storage).
    opt = torch.optim.SGD(params, lr=0.1)
    loss = lu_linear(torch.randn(16, c), p["perm"], p["lower"], p["upper"], p["log_s"], p["sign"])[0].pow(2).sum()
    loss.backward()
    ptr = p["lower"].data_ptr()
    opt.step()
    assert p["lower"].data_ptr() == ptr
    x2 = inv()
    assert stats["misses"] == m0 + 1, "an optimizer step must invalidate the cached inverse"
    assert not torch.allclose(x2, x1)
    torch.testing.assert_close(x2.double(), oracle(), rtol=1e-4, atol=1e-5)
    # A write through .data bumps no version counter: the snapshot check catches it.
    with torch.no_grad():
        p["upper"].data.mul_(0.5)
    x3 = inv()
    torch.testing.assert_close(x3.double(), oracle(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x3, x2)


# ------------------------------------------------------------------ bad input and dispatch


def test_half_precision_on_cpu():
    c = 6
    p = make_params(c, torch.float32)
    x = torch.randn(4, c, 3, 3)
    for dtype in (torch.float16, torch.bfloat16):
        q = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
        y, lad = call("actnorm_conv1x1", x.to(dtype), q)
        qd = {k: v.double() if v.is_floating_point() else v for k, v in q.items()}
        ye, lade, _ = dense("actnorm_conv1x1", x.to(dtype).double(), qd)
        assert y.dtype == dtype and lad.dtype == dtype
        torch.testing.assert_close(y.double(), ye, **tolerances(dtype))
        torch.testing.assert_close(lad.double(), lade, **tolerances(dtype))


# ------------------------------------------------------------------ small-input GEMM path


@pytest.mark.parametrize("b,c,n", [(8, 4, 16), (3, 5, 7)])
def test_small_channels_first_path_matches_batched(monkeypatch, b, c, n):
    """Small inputs go through one channels-first GEMM instead of a batched one: same maths."""
    from fastflow.kernels.torch import lu as ref

    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    g3 = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    a_mat, bias = torch.randn(c, c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    assert ref._small(x3)
    small = (ref.apply_affine(x3, a_mat, bias), *ref.data_grads(g3, x3, a_mat))
    monkeypatch.setattr(ref, "SMALL_ELEMS", 0)
    assert not ref._small(x3)
    batched = (ref.apply_affine(x3, a_mat, bias), *ref.data_grads(g3, x3, a_mat))
    oracle_y = torch.einsum("ij,bjn->bin", a_mat, x3) + bias[:, None]
    torch.testing.assert_close(small[0], oracle_y, rtol=1e-12, atol=1e-12)
    for s, t in zip(small, batched):
        assert s.shape == t.shape and s.is_contiguous()
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["lu_conv1x1", "actnorm_conv1x1"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_large_input_expanded_and_strided_gradients(op, backend):
    """Above the small-input bound, an output gradient expanded from a scalar (y.sum()) and a
    batch-strided input give bitwise the gradients of the same values made dense, and the
    batched GEMMs get dense operands (CPU bmm clones every sample's matrix of a stride-0 or
    irregular operand, which doubled the forward+backward time at 4M elements)."""
    from torch.profiler import profile

    from fastflow.kernels.torch import lu as ref

    b, c = 24, 6
    p = make_params(c, dtype=torch.float32)
    x = torch.randn(2 * b, c, 16, 16)[::2]  # every other sample: a batch-strided view
    assert x.numel() > ref.SMALL_ELEMS and not x.is_contiguous()
    g_lad = torch.ones(()).expand(b)
    g_const = torch.full((), 0.5).expand(x.shape)
    got = with_grads(op, x, p, g_const, g_lad, backend=backend)
    want = with_grads(op, x.contiguous(), p, g_const.contiguous(), g_lad.contiguous(), backend=backend)
    for a, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    oracle = with_grads(op, x.double(), {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()},
                        g_const.double(), g_lad.double(), backend="reference")
    for a, w in zip(got[2], oracle[2]):
        torch.testing.assert_close(a.double(), w, **tolerances(torch.float32))
    with profile() as prof:
        with_grads(op, x, p, g_const, g_lad, backend=backend)
    clones = sum(e.count for e in prof.key_averages() if e.key == "aten::clone")
    assert clones < b, f"{clones} clones for {b} samples: per-sample copies inside bmm"
