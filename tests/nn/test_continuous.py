"""Continuous flows (FFJORD on torchdiffeq): ODE round trips (dopri5, rk4, adjoint), the exact-trace
log-det against the slogdet of the autograd Jacobian of the solved map, Hutchinson's trace unbiased
(Gaussian and Rademacher, within 3 standard errors, power checked), adjoint gradients equal the
direct ones, fp64 gradcheck, flow matching trains the vector field and the ODE density then
integrates to one on a grid, the objective switch and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastflow.data as data
from fastflow.flows import build, training_loss
from fastflow.nn.continuous import CNF
from fastflow.testing import jacobian_logabsdet


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _cnf(method="dopri5", adjoint=False, context=None, seed=0, **kw):
    torch.manual_seed(seed)
    cnf = CNF(2, 16, 2, context_features=context, method=method, adjoint=adjoint, **kw).double()
    with torch.no_grad():
        for p in cnf.parameters():
            p.add_(0.4 * torch.randn_like(p))
    return cnf.eval()


@pytest.mark.parametrize("method,adjoint", [("dopri5", False), ("dopri5", True), ("rk4", False)])
def test_ode_round_trip(method, adjoint):
    cnf = _cnf(method, adjoint, rtol=1e-8, atol=1e-8, step_size=0.02)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        z, lad = cnf(x)
        xr, ilad = cnf.inverse(z)
    assert float((z - x).abs().max()) > 0.1  # a map that moves points
    torch.testing.assert_close(xr, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ilad, -lad, rtol=0, atol=1e-6)
    assert cnf.last_solve_info["nfe"] > 0


@pytest.mark.parametrize("context", [None, 2])
def test_exact_trace_logdet_matches_jacobian(context):
    cnf = _cnf(context=context, rtol=1e-9, atol=1e-9)
    x = torch.randn(2, 2, dtype=torch.float64)
    c = torch.randn(2, context, dtype=torch.float64) if context else None
    _, lad = cnf(x, c)
    for i in range(2):
        ci = None if c is None else c[i:i + 1]
        ref = jacobian_logabsdet(lambda v, ci=ci: cnf(v, ci)[0], x[i:i + 1])
        torch.testing.assert_close(lad[i:i + 1].detach(), ref, rtol=0, atol=1e-6)
    assert float(lad.detach().abs().min()) > 0.05
    if context:
        assert float((cnf(x, torch.zeros_like(c))[1] - lad).detach().abs().max()) > 1e-3


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_trace_is_unbiased(probe):
    # rk4 with a fixed step: the states do not depend on the probe and the log-det is linear in the
    # trace estimates, so the mean over probes is the exact-trace log-det of the same scheme.
    cnf = _cnf("rk4", step_size=0.1, probe=probe, trace="hutchinson")
    x = torch.randn(3, 2, dtype=torch.float64)
    reps = 2000
    with torch.no_grad():
        exact = cnf(x, trace="exact")[1]
        draws = cnf(x.repeat(reps, 1), trace="hutchinson")[1].reshape(reps, 3)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(reps)
    print(f"hutchinson/{probe}: variance {draws.var(0).tolist()}")
    assert bool(((mean - exact).abs() <= 3 * se).all()), (mean, exact, se)
    assert bool((draws.std(0) > 1e-3).all())  # the estimator is random: the check has something to check
    assert float((exact - exact.mean()).abs().max()) > 5 * float(se.max())  # and it tells samples apart


def test_adjoint_gradients_equal_direct_gradients():
    x = torch.randn(4, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        cnf = _cnf("dopri5", adjoint, rtol=1e-9, atol=1e-9, trace="exact")
        cnf.train()
        xg = x.clone().requires_grad_(True)
        z, lad = cnf(xg)
        loss = (z.pow(2).sum(1) - lad).sum()
        params = list(cnf.field.parameters())
        g = torch.autograd.grad(loss, [xg] + params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_gradcheck_rk4_exact_trace():
    cnf = _cnf("rk4", step_size=0.25, context=1)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cnf(a, b), (x, c))
    assert torch.autograd.gradcheck(lambda a, b: cnf.inverse(a, b), (x, c))


def test_flow_matching_fit_then_ode_density_integrates_to_one():
    torch.manual_seed(0)
    train, test = data.load("moons", "train"), data.load("moons", "test")
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    flow = build("cnf", (2,), hidden_features=64, num_layers=2, rtol=1e-4, atol=1e-4)
    opt = torch.optim.Adam(flow.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        idx = torch.randint(0, len(train), (256,), generator=g)
        loss = training_loss(flow, train[idx], "flow-matching")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-25:]) < 0.9 * sum(losses[:25])
    flow.eval()
    with torch.no_grad():
        nll = float(-flow.log_prob(test[:500]).mean())
    gauss_nll = float(-gauss.log_prob(test[:500]).mean())
    assert nll < gauss_nll - 0.2, (nll, gauss_nll)  # trained without a single ODE solve
    lim, n = 6.5, 90
    grid = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp()
    mass = float(p.sum() * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1.0) < 0.02, mass
    # the same flow by maximum likelihood through the ODE: one step runs and lowers nothing to NaN
    flow.train()
    nll_loss = training_loss(flow, train[:64], "nll")
    nll_loss.backward()
    assert math.isfinite(float(nll_loss.detach()))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in flow.parameters())


def test_objectives_and_bad_arguments():
    flow = build("cnf", (2,), hidden_features=8, num_layers=1)
    x = torch.randn(6, 2)
    assert training_loss(flow, x, "flow-matching").shape == ()
    assert flow.training_loss(x, objective="flow-matching").shape == ()
    with pytest.raises(ValueError, match="objective"):
        training_loss(flow, x, "score-matching")
    with pytest.raises(ValueError, match="continuous flow"):
        training_loss(build("realnvp", (2,), num_layers=1, hidden_features=8), x, "flow-matching")
    with pytest.raises(ValueError, match="method"):
        CNF(2, method="heun-magic")
    with pytest.raises(ValueError, match="num_layers"):
        build("cnf", (2,), num_layers=0)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        flow.cnf(torch.randn(3, 5))
    flow.eval()
    with torch.no_grad():
        assert flow.log_prob(torch.zeros(0, 2)).shape == (0,)
        assert flow.sample(0).shape == (0, 2)
        assert flow.sample(3).shape == (3, 2)
    # plain sampling skips the trace and gives the same points (up to the adaptive solver's tolerance)
    torch.manual_seed(1)
    s_fast = flow.sample(4)
    torch.manual_seed(1)
    s_full = flow.sample_and_log_prob(4)[0]
    torch.testing.assert_close(s_fast, s_full, rtol=0, atol=1e-3)  # adaptive steps differ: solver tolerance
    # images are flattened; the spec rebuilds the flow
    img = build("cnf", (1, 2, 2), hidden_features=8, num_layers=1, method="rk4", step_size=0.5)
    other = build(**img.spec)
    other.load_state_dict(img.state_dict())
    xi = torch.randn(3, 1, 2, 2)
    img.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(xi), img.log_prob(xi))
    assert training_loss(img, xi, "flow-matching").shape == ()


def test_conditional_cnf_samples_carry_their_log_density():
    torch.manual_seed(0)
    flow = build("cnf", (2,), context_features=3, hidden_features=8, num_layers=1, rtol=1e-8, atol=1e-8).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    flow.eval()
    ctx = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        xs, lps = flow.sample_and_log_prob(4, ctx)
        assert xs.shape == (2, 4, 2) and lps.shape == (2, 4)
        flat = flow.log_prob(xs.reshape(-1, 2), ctx.repeat_interleave(4, 0))
        torch.testing.assert_close(flat, lps.reshape(-1), rtol=0, atol=1e-5)
        other = flow.log_prob(xs.reshape(-1, 2), ctx.flip(0).repeat_interleave(4, 0))
    assert float((other - flat).abs().max()) > 1e-3
    assert training_loss(flow, xs.reshape(-1, 2), "flow-matching", ctx.repeat_interleave(4, 0)).shape == ()
