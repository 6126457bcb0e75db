"""``cnf`` under bad settings and bad rows: settings checked when the flow is built, every solve
capped at ``max_num_steps`` with a clear error, a non-finite row confined to its own outputs."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.flows import build
from fastflow.nn.continuous import CNF, ODESolverError
from fastflow.nn.residual import ConvergenceError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _flow(**kw):
    torch.manual_seed(0)
    return build("cnf", (2,), hidden_features=8, num_layers=1, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "context"])
def test_non_finite_row_is_confined_to_its_log_prob(bad, where):
    flow = _flow(context_features=2 if where == "context" else None).eval()
    x = torch.randn(5, 2)
    c = torch.randn(5, 2) if where == "context" else None
    (x if where == "x" else c)[2, 1] = bad
    keep = torch.tensor([0, 1, 3, 4])
    with torch.no_grad():
        lp = flow.log_prob(x, c)
        ref = flow.log_prob(x[keep], None if c is None else c[keep])
    assert lp.shape == (5,) and math.isnan(float(lp[2]))
    torch.testing.assert_close(lp[keep], ref)


def test_non_finite_rows_keep_gradients_of_the_others():
    flow = _flow().train()
    x = torch.randn(4, 2)
    x[0] = float("nan")
    x.requires_grad_(True)
    lp = flow.log_prob(x)
    assert math.isnan(float(lp[0].detach())) and torch.isfinite(lp[1:]).all()
    lp[1:].sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad[0].abs().sum()) == 0
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)


def test_every_row_non_finite_runs_no_solve():
    flow = _flow().eval()
    cnf = flow.cnf
    x = torch.full((3, 2), float("nan"))
    with torch.no_grad():
        z, lad = cnf(x)
        xi, ilad = cnf.inverse(x)
    for t in (z, lad, xi, ilad):
        assert torch.isnan(t).all()
    assert z.shape == (3, 2) and lad.shape == (3,)


@pytest.mark.parametrize("kw,error", [
    ({"rtol": -1}, ValueError),
    ({"atol": -1e-5}, ValueError),
    ({"rtol": float("nan")}, ValueError),
    ({"atol": float("inf")}, ValueError),
    ({"rtol": 0, "atol": 0}, ValueError),
    ({"rtol": "1e-5"}, TypeError),
    ({"t1": 0}, ValueError),
    ({"t1": -1.0}, ValueError),
    ({"t1": float("inf")}, ValueError),
    ({"t1": float("nan")}, ValueError),
    ({"method": "rk4", "step_size": 0}, ValueError),
    ({"method": "rk4", "step_size": float("nan")}, ValueError),
    ({"method": "euler", "step_size": -0.1}, ValueError),
    ({"max_num_steps": 0}, ValueError),
    ({"max_num_steps": 10.5}, ValueError),
    ({"max_num_steps": True}, ValueError),
    ({"sigma_min": -0.1}, ValueError),
    ({"sigma_min": 1.0}, ValueError),
    ({"sigma_min": float("nan")}, ValueError),
])
def test_bad_settings_refused_when_built(kw, error):
    with pytest.raises(error):
        _flow(**kw)


def test_fixed_grid_finer_than_the_step_cap_refused_before_allocating():
    # 1e9 Euler steps used to allocate the time grid and the trajectory until the machine ran out.
    with pytest.raises(ValueError, match="max_num_steps"):
        _flow(method="euler", step_size=1e-9)
    with pytest.raises(ValueError, match="max_num_steps"):
        CNF(2, 8, 1, method="rk4", step_size=1e-4)
    CNF(2, 8, 1, method="rk4", step_size=1e-4, max_num_steps=10_000)  # allowed when asked for
    flow = _flow(method="rk4", step_size=0.25, max_num_steps=4)
    assert flow.spec["kwargs"]["max_num_steps"] == 4
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(torch.randn(3, 2))).all()


def test_adaptive_solve_stops_at_the_step_cap():
    flow = _flow(rtol=1e-14, atol=1e-14, max_num_steps=25).eval()  # below float32's resolution
    with pytest.raises(ODESolverError, match="max_num_steps=25") as info, torch.no_grad():
        flow.log_prob(torch.randn(4, 2))
    assert isinstance(info.value, ConvergenceError)
    assert flow.cnf.dynamics.nfe <= 6 * 26 + 10  # dopri5: six evaluations a step, plus the first-step guess


def test_huge_t1_gives_a_clear_error():
    flow = _flow(t1=1e9).eval()
    with pytest.raises(ODESolverError, match="t1"), torch.no_grad():
        flow.log_prob(torch.randn(4, 2))


def test_spec_rebuilds_with_the_cap():
    flow = _flow(max_num_steps=50)
    again = build(**flow.spec)
    assert again.cnf.max_num_steps == 50 and "max_num_steps=50" in repr(again.cnf)
