"""The CNF's exported solve (fastflow/nn/_ode.py) against its oracle, torchdiffeq on the same
field, and the closed-form trace against autograd's; the exported default (dopri5) cnf against
eager."""

from __future__ import annotations

import pytest
import torch

from fastflow.flows import build
from fastflow.flows.export import LogProb, NotExportableError, export_flow
from fastflow.nn.continuous import CNF, ODESolverError, ODEVectorField

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu", "elu"])
@pytest.mark.parametrize("context", [None, 2])
def test_closed_form_trace_is_autograds(activation, context):
    torch.manual_seed(0)
    field = ODEVectorField(3, 8, 2, context_features=context, activation=activation).double()
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, context, dtype=torch.float64) if context else None
    v, tr = field.value_and_trace(0.3, z, c)
    dz = field(0.3, z, c)
    want = sum(torch.autograd.grad(dz[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(3))
    torch.testing.assert_close(v, dz, rtol=0, atol=0)
    torch.testing.assert_close(tr, want, rtol=1e-12, atol=1e-12)


def _cnf(method, dtype, **kw):
    torch.manual_seed(1)
    cnf = CNF(3, 16, 2, method=method, step_size=0.1, **kw).to(dtype).eval()
    with torch.no_grad():  # a field far from zero: the adaptive solve takes tens of steps
        for p in cnf.parameters():
            p.mul_(2)
    return cnf


@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler", "midpoint"])
@pytest.mark.parametrize("span", [(0.0, 1.0), (1.0, 0.0)], ids=["inverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_traced_solve_is_torchdiffeqs(method, span, dtype):
    cnf = _cnf(method, dtype)
    x = torch.randn(6, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = cnf._solve(x, None, *span)  # torchdiffeq.odeint
        got = cnf._solve_traced(x, None, *span)
    assert cnf.last_solve_info["nfe"] >= 10
    if dtype == torch.float64:  # the same steps: round-off apart
        tol = dict(rtol=1e-11, atol=1e-11)
    elif method == "dopri5":
        # float32: the same steps, but sums in another order round differently over 26 stages
        # (4.8e-6 here); a step decision on the edge could differ: within the solver's rtol/atol
        tol = dict(rtol=cnf.rtol, atol=cnf.atol)
    else:
        tol = dict(rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_traced_solve_returns_nan_where_eager_raises():
    cnf = _cnf("dopri5", torch.float64, max_num_steps=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ODESolverError):
        cnf._solve(x, None, 0.0, 1.0)
    with torch.no_grad():
        z, lad = cnf._solve_traced(x, None, 0.0, 1.0)
    assert torch.isnan(z).all() and torch.isnan(lad).all()


def test_non_finite_rows_are_masked_in_the_traced_solve():
    cnf = _cnf("rk4", torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    bad = x.clone()
    bad[2, 1] = float("inf")
    with torch.no_grad():
        z, lad = cnf._solve_traced(bad, None, 1.0, 0.0)
        ze, le = cnf._solve(x[[0, 1, 3]], None, 1.0, 0.0)
    assert torch.isnan(z[2]).all() and torch.isnan(lad[2])
    torch.testing.assert_close(z[[0, 1, 3]], ze, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad[[0, 1, 3]], le, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("context", [None, 2])
def test_default_cnf_exports_with_its_adaptive_solver(context):
    torch.manual_seed(3)
    flow = build("cnf", (2,), context_features=context, hidden_features=16, num_layers=2).eval()
    assert flow.transform.method == "dopri5" if hasattr(flow.transform, "method") else True
    c4 = torch.randn(4, context) if context else None
    run = export_flow(flow, "log_prob", batch=4, dynamic_batch=True, context=c4).module()
    x = torch.randn(7, 2)
    c = torch.randn(7, context) if context else None
    got = run(x) if c is None else run(x, c)
    with torch.no_grad():
        want = LogProb(flow)(x, c)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hutchinson_trace_cannot_export():
    flow = build("cnf", (2,), hidden_features=8, num_layers=1).train()  # training mode: Hutchinson
    with pytest.raises(NotExportableError, match="Hutchinson.*eval_trace='exact'"):
        export_flow(flow, "log_prob")
