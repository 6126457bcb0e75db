"""ARCHITECTURE.md's recipe for a new spline parameterisation, executed: one row of the table
(``kernels/_facts.SPLINE_PARAMETERIZATIONS``) and one prologue per backend that runs it fused.
Here the backend is the reference, whose prologues are Python entries (``PROLOGUES``); a compiled
backend's prologue is a branch in its kernels' source, which a test cannot add at run time. With
nothing else changed, the op runs the new parameterisation: its public entry, the backend choice
(``backend=None`` falls back to a backend that declares it, a forced one without it is refused),
the fused backward, the composite and the checks of any other parameterisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastflow import BackendUnavailableError
from fastflow.backends import BACKENDS
from fastflow.kernels import _facts
from fastflow.kernels.reference import spline as ref
from fastflow.ops.rq_spline import rq_spline_accepts, rq_spline_unchecked
from fastflow.testing import jacobian_logabsdet

BOX = (0.0, 2.0, -1.0, 3.0)  # not a square: the test-only "affine box" variant


@pytest.fixture
def affine_box(monkeypatch):
    """The new parameterisation: nflows' sizes and interior slopes on any box (left, right,
    bottom, top), unit boundary slopes. Its whole diff: the table row and the reference's
    prologue (here nflows' own sizes, slopes and chain rule, on the new box kind)."""
    monkeypatch.setitem(_facts.SPLINE_PARAMETERIZATIONS, "affine_box", _facts.SplineParameterization(
        code=3, n_derivs=-1, box="box", public="rq_spline_affine_box",
        rule="nflows' sizes and interior slopes on the box (left, right, bottom, top), unit boundary slopes"))
    monkeypatch.setitem(ref.PROLOGUES, "affine_box", ref.PROLOGUES["nflows"])
    reference = BACKENDS["reference"]
    monkeypatch.setitem(BACKENDS, "reference", dataclasses.replace(
        reference, parameterizations=reference.parameterizations + ("affine_box",)))
    return "affine_box"


def _inputs(n=7, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = BOX[0] + (BOX[1] - BOX[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    return x, *(torch.randn(n, m, generator=g, dtype=torch.float64) for m in (k, k, k - 1))


def test_the_op_runs_it_on_the_backend_that_declares_it(affine_box):
    x, uw, uh, ud = _inputs()
    assert rq_spline_accepts(x, uw, uh, ud, parameterization=affine_box, box=BOX)
    assert not rq_spline_accepts(x, uw, uh, ud[..., :2], parameterization=affine_box, box=BOX)
    y, lad = rq_spline_unchecked(x, uw, uh, ud, parameterization=affine_box, box=BOX)  # backend=None
    want_y, want_lad = ref.rq_spline_param_reference(x, uw, uh, ud, False, affine_box, BOX, 1e-3, 1e-3, 1e-3)
    assert torch.equal(y, want_y) and torch.equal(lad, want_lad)
    assert bool(((y >= BOX[2]) & (y <= BOX[3])).all())  # the box maps onto [bottom, top]
    x_back, lad_inv = rq_spline_unchecked(y, uw, uh, ud, parameterization=affine_box, box=BOX, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(lad_inv, -lad, rtol=0, atol=1e-12)
    naive = jacobian_logabsdet(lambda v: rq_spline_unchecked(v[0], uw, uh, ud, parameterization=affine_box,
                                                             box=BOX)[0][None], x[None])
    torch.testing.assert_close(lad.sum(), naive[0], rtol=1e-10, atol=1e-10)


def test_fused_backward_and_composite(affine_box):
    x, uw, uh, ud = (t.requires_grad_() for t in _inputs(n=4, k=3, seed=1))

    def f(*ts):
        return rq_spline_unchecked(*ts, parameterization=affine_box, box=BOX)

    assert torch.autograd.gradcheck(f, (x, uw, uh, ud))
    assert torch.autograd.gradgradcheck(f, (x, uw, uh, ud))


def test_a_forced_backend_without_it_is_refused(affine_box):
    x, uw, uh, ud = _inputs()
    with pytest.raises(BackendUnavailableError, match="'affine_box'"):
        rq_spline_unchecked(x, uw, uh, ud, parameterization=affine_box, box=BOX, backend="numba")


def test_a_row_alone_is_claimed_by_no_backend(monkeypatch):
    # step 1 without step 2: no backend runs the row (a compiled kernel would otherwise take an
    # unknown code down another row's branch), and the call says so
    monkeypatch.setitem(_facts.SPLINE_PARAMETERIZATIONS, "affine_box", _facts.SplineParameterization(
        code=3, n_derivs=-1, box="box", public="rq_spline_affine_box", rule="(no prologue anywhere)"))
    x, uw, uh, ud = _inputs()
    with pytest.raises(BackendUnavailableError, match="no backend has kernels for the 'affine_box'"):
        rq_spline_unchecked(x, uw, uh, ud, parameterization="affine_box", box=BOX)


def test_each_backend_declares_the_prologues_its_kernels_have():
    # the declaration (Backend.parameterizations) is what each kernel module implements
    assert set(BACKENDS["reference"].parameterizations) == set(ref.PROLOGUES)
    from fastflow.kernels.numba import spline as nb_spline

    codes = {nb_spline.NFLOWS, nb_spline.BOUNDED, nb_spline.ZUKO}
    assert {_facts.SPLINE_PARAMETERIZATIONS[n].code for n in BACKENDS["numba"].parameterizations} == codes
    pytest.importorskip("triton")
    from fastflow.kernels.triton import spline as tr_spline

    assert tuple(tr_spline.KINDS) == BACKENDS["triton"].parameterizations
