"""float64 in the Triton spline and coupling kernels (computed in float64), against the reference
at float64 tolerances, and the routing that sends float64 GPU tensors to them.

Run under the interpreter (``TRITON_INTERPRET=1 pytest -m triton``) on the CPU, or on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastflow.backends import BACKENDS, resolve_backend
from fastflow.kernels.reference.spline import rq_spline_reference
from fastflow.ops import affine_coupling, additive_coupling, rescale, rq_spline
from fastflow.testing import outputs_and_grads, tolerances
from tests._backends import HAS_CUDA, INTERPRET

needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
pytestmark = [pytest.mark.triton]
DEV = "cuda" if HAS_CUDA else "cpu"
F64 = tolerances(torch.float64)
# Scalars exact in float32: the interpreter turns a Python-float argument into a float32 constant
# (tl.cast of a Python float), where the compiled kernel takes it as the float64 its annotation
# says. With 1e-3 the interpreted kernel's minimum bin sizes differed from the reference's by
# 5e-11, which the ill-conditioned inverse near the bounds magnified past 1e-5.
MINS = dict(min_bin_width=2.0**-10, min_bin_height=2.0**-10, min_derivative=2.0**-10)


def _close(got, ref):
    # float64 tolerances; the absolute one scaled by the tensor's largest entry, as the float64
    # CPU kernels are held to nflows (tests/ops/test_rq_spline.py): a gradient entry that is a
    # difference of large terms carries their round-off, not its own.
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        scale = float(b.abs().max().clamp_min(1.0)) if b.numel() else 1.0
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=F64["rtol"], atol=F64["rtol"] * scale)


@needs_triton
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8, 23, 64])
def test_spline_float64_matches_reference(k, inverse):
    gen = torch.Generator().manual_seed(100 + k)
    n = 2**9 + 17
    x = torch.randn(n, dtype=torch.float64, generator=gen) * 2.5 * 1.2  # some in the tails
    uw, uh = (torch.randn(n, k, dtype=torch.float64, generator=gen) * 2 for _ in range(2))
    ud = torch.randn(n, k - 1, dtype=torch.float64, generator=gen) * 2
    if inverse:
        x = rq_spline_reference(x, uw, uh, ud, tail_bound=2.5, **MINS)[0]
    args = [t.to(DEV) for t in (x, uw, uh, ud)]
    g_out, g_lad = (torch.randn(n, dtype=torch.float64, generator=gen).to(DEV) for _ in range(2))
    got = outputs_and_grads(rq_spline, args, g_out, g_lad, inverse=inverse, tail_bound=2.5, backend="triton", **MINS)
    ref = outputs_and_grads(rq_spline, [a.cpu() for a in args], g_out.cpu(), g_lad.cpu(), inverse=inverse,
                            tail_bound=2.5, backend="reference", **MINS)
    _close((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]))


@needs_triton
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
def test_affine_float64_matches_reference(scale, inverse):
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(9, 6, 5, 7, dtype=torch.float64, generator=gen)
    h = torch.randn(9, 6, 5, 7, dtype=torch.float64, generator=gen) * 1.5
    x, shift, raw = full[:, :3], h[:, ::2], h[:, 1::2]  # strided views, as a coupling layer passes them
    g_out = torch.randn(9, 3, 5, 7, dtype=torch.float64, generator=gen)
    g_lad = torch.randn(9, dtype=torch.float64, generator=gen)
    kw = dict(scale=scale, inverse=inverse)
    got = outputs_and_grads(affine_coupling, [t.to(DEV) for t in (x, shift, raw)], g_out.to(DEV), g_lad.to(DEV),
                            backend="triton", **kw)
    ref = outputs_and_grads(affine_coupling, (x, shift, raw), g_out, g_lad, backend="reference", **kw)
    _close((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]))


@needs_triton
@pytest.mark.parametrize("inverse", [False, True])
def test_additive_and_rescale_float64_match_reference(inverse):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(33, 4, 6, dtype=torch.float64, generator=gen)
    t = torch.randn(33, 4, 6, dtype=torch.float64, generator=gen)
    ls = torch.randn(4, 6, dtype=torch.float64, generator=gen) * 0.7
    got = additive_coupling(x.to(DEV), t.to(DEV), inverse=inverse, backend="triton")
    ref = additive_coupling(x, t, inverse=inverse, backend="reference")
    _close(got, ref)
    g_out = torch.randn(33, 4, 6, dtype=torch.float64, generator=gen)
    g_lad = torch.randn(33, dtype=torch.float64, generator=gen)
    got = outputs_and_grads(rescale, [x.to(DEV), ls.to(DEV)], g_out.to(DEV), g_lad.to(DEV), inverse=inverse,
                            backend="triton")
    ref = outputs_and_grads(rescale, (x, ls), g_out, g_lad, inverse=inverse, backend="reference")
    _close((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2]))


def test_triton_takes_float64_for_spline_and_coupling_only():
    triton = BACKENDS["triton"]
    for op in ("rq_spline", "affine_coupling", "additive_coupling", "rescale"):
        assert torch.float64 in triton.op_dtypes.get(op, ())
    for op in ("lu_linear", "lu_conv1x1", "actnorm_conv1x1"):  # LU kernels compute in float32
        assert torch.float64 not in triton.dtypes + triton.op_dtypes.get(op, ())


@needs_triton
def test_backend_none_picks_triton_for_float64():
    x = torch.zeros(4, dtype=torch.float64, device=DEV)
    assert resolve_backend("rq_spline", x) == "triton"
    assert resolve_backend("affine_coupling", x) == "triton"
    assert resolve_backend("lu_linear", x.view(2, 2)) != "triton"
