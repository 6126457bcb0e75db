"""Residual flows: spectral normalisation bounds Lip(g), LipSwish is 1-Lipschitz, the exact log-det
equals the slogdet of the autograd Jacobian, the power-series and Russian-roulette estimators
are unbiased (mean of many draws within 3 standard errors of the exact value, with the test's
power checked), the Neumann-series gradient is unbiased, the fixed-point inverse round-trips and
reports non-convergence, fp64 gradcheck (inverse included), and a short fit gives a density that
integrates to one on a grid."""

from __future__ import annotations

import math

import pytest
import torch

import fastflow.data as data
from fastflow.flows import build
from fastflow.nn.residual import ConvergenceError, LipSwish, ResidualBlock, SpectralNormLinear, residual_logdet
from fastflow.testing import jacobian_logabsdet

D = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _strong_block(d=D, context=None, coeff=0.9, num_hidden=1, seed=0):
    """A block whose Jacobian is close to its Lipschitz budget: weights on the spectral bound,
    ``W_out = W_in^T`` (so ``J`` is near positive semi-definite) and pre-activations where the
    LipSwish slope is near 1; ``||J||`` is then about 0.75, so many series terms matter."""
    torch.manual_seed(seed)
    blk = ResidualBlock(d, 16, num_hidden, context_features=context, coeff=coeff).double()
    with torch.no_grad():
        first, last = blk.net.linears[0], blk.net.linears[-1]
        for lin in blk.net.linears:
            lin.weight.mul_(20.0)
            lin.bias.fill_(3.0)
        if num_hidden == 1:
            last.weight.copy_(first.weight.t())
        last.bias.normal_(0, 0.5)
        for act in blk.net.acts:
            act.b.fill_(2.0)
    blk.train()
    for _ in range(20):  # converge the power iterations onto the new weights
        blk.net(torch.zeros(1, d, dtype=torch.float64), None if context is None else torch.zeros(1, context,
                                                                                                  dtype=torch.float64))
    return blk.eval()


def test_spectral_norm_bounds_lipschitz():
    torch.manual_seed(0)
    lin = SpectralNormLinear(7, 5, coeff=0.8).double()
    with torch.no_grad():
        lin.weight.mul_(30.0)
    lin.train()
    for _ in range(30):
        lin(torch.zeros(1, 7, dtype=torch.float64))
    w = lin.normalized_weight()
    torch.testing.assert_close(torch.linalg.matrix_norm(w, ord=2), torch.tensor(0.8, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    blk = _strong_block()
    lip = blk.lipschitz_bound()
    assert lip <= 0.9**2 + 1e-6
    # an empirical Lipschitz ratio never exceeds the bound
    x, y = torch.randn(200, D, dtype=torch.float64), torch.randn(200, D, dtype=torch.float64)
    with torch.no_grad():
        ratio = (blk.net(x) - blk.net(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert float(ratio.max()) <= lip + 1e-9


def test_lipswish_is_one_lipschitz():
    act = LipSwish().double()
    x = torch.linspace(-10, 10, 4001, dtype=torch.float64, requires_grad=True)
    for b in (-3.0, 0.0, 1.0, 5.0):
        with torch.no_grad():
            act.b.fill_(b)
        (d,) = torch.autograd.grad(act(x).sum(), x)
        assert float(d.abs().max()) <= 1.0
    assert float(d.abs().max()) > 0.95  # the bound is nearly attained, so it is the right one


@pytest.mark.parametrize("context", [None, 2])
def test_exact_logdet_and_fixed_point_round_trip(context):
    blk = _strong_block(context=context)
    x = torch.randn(4, D, dtype=torch.float64)
    c = torch.randn(4, context, dtype=torch.float64) if context else None
    y, lad = blk(x, c)
    for i in range(4):
        ci = None if c is None else c[i:i + 1]
        ref = jacobian_logabsdet(lambda v, ci=ci: blk(v, ci)[0], x[i:i + 1])
        torch.testing.assert_close(lad[i:i + 1], ref, rtol=1e-10, atol=1e-10)
    assert float(lad.detach().abs().min()) > 0.3  # not a near-identity block
    xr, ilad = blk.inverse(y, c)
    info = blk.last_inverse_info
    assert info["converged"] and info["iterations"] > 3
    torch.testing.assert_close(xr, x, rtol=0, atol=20 * (blk.atol + blk.rtol * float(x.abs().max())))
    torch.testing.assert_close(ilad, -lad, rtol=1e-6, atol=1e-6)
    if context:
        assert float((blk(x, torch.zeros_like(c))[0] - y).detach().abs().max()) > 1e-2


@pytest.mark.parametrize("context", [None, 2])
def test_closed_form_jacobian_is_autograds(context, monkeypatch):
    """The exact route's Jacobian (chain rule written out) against autograd's, and its gradients
    (parameters and x, through the slogdet) against fp64 gradcheck."""
    import fastflow.nn.residual as residual

    monkeypatch.setattr(residual, "_CLOSED_FORM_MIN_FEATURES", 1)  # eagerly too at this small D
    blk = _strong_block(context=context)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, context, dtype=torch.float64) if context else None
    gx, jac = blk.net.value_and_jacobian(x, c)
    torch.testing.assert_close(gx, blk.net(x, c), rtol=1e-13, atol=1e-13)
    for i in range(3):
        ci = None if c is None else c[i:i + 1]
        want = torch.autograd.functional.jacobian(lambda v, ci=ci: blk.net(v, ci), x[i:i + 1].detach())
        torch.testing.assert_close(jac[i], want[0, :, 0], rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda v: blk.logabsdet(v, c, estimator="exact")[1], (x,))
    # parameter gradients: the closed form against the generic autograd-Jacobian route
    params = list(blk.parameters())
    got = torch.autograd.grad(blk.logabsdet(x, c, estimator="exact")[1].sum(), params, allow_unused=True)
    xg = x.detach().requires_grad_(True)
    want = torch.autograd.grad(residual_logdet(blk.net(xg, c), xg, "exact").sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_training_mode_inverse_does_not_move_the_weights():
    blk = _strong_block().train()
    u0 = [lin.u.clone() for lin in blk.net.linears]
    y = torch.randn(4, D, dtype=torch.float64)
    x, _ = blk.inverse(y)
    assert all(torch.equal(a, lin.u) for a, lin in zip(u0, blk.net.linears))
    torch.testing.assert_close(blk.net(x) + x, y, rtol=0, atol=1e-5)
    blk(y)  # a training forward does take a power-iteration step
    assert not all(torch.equal(a, lin.u) for a, lin in zip(u0, blk.net.linears))


def test_inverse_non_convergence_is_reported():
    blk = _strong_block()
    blk.max_iter = 2
    y = torch.randn(5, D, dtype=torch.float64) * 3
    with pytest.raises(ConvergenceError, match="did not converge"):
        blk.inverse(y)
    assert blk.last_inverse_info["converged"] is False
    blk.on_nonconvergence = "warn"
    with pytest.warns(RuntimeWarning, match="did not converge"):
        blk.inverse(y)


def _draws(blk, x, estimator, n_draws, probe="gaussian", replicas=64, **kw):
    """``n_draws`` independent estimates per sample: one call replicates ``x`` ``replicas`` times
    (independent probes, one shared roulette length), the per-call mean is one draw."""
    xr = x.repeat(replicas, 1).requires_grad_(True)
    gx = blk.net(xr)
    out = []
    for _ in range(n_draws):
        v = residual_logdet(gx, xr, estimator, probe=probe, create_graph=False, **kw)
        out.append(v.reshape(replicas, x.shape[0]).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("estimator,probe", [("roulette", "gaussian"), ("roulette", "rademacher"),
                                             ("series", "gaussian")])
def test_estimators_are_unbiased(estimator, probe):
    blk = _strong_block()
    torch.manual_seed(3)
    x = torch.randn(3, D, dtype=torch.float64)
    with torch.enable_grad():
        exact = blk.logabsdet(x, estimator="exact")[1].detach()
        draws = _draws(blk, x, estimator, 60, probe, n_terms=20)  # truncation bias < 1e-3 << the 3 SE (~0.05)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    print(f"{estimator}/{probe}: variance per single-probe draw "
          f"{(draws.var(0) * 64).tolist()}, exact {exact.tolist()}")
    assert bool(((mean - exact).abs() <= 3 * se + 1e-12).all()), (mean, exact, se)
    # power: the first-order term alone (tr J) is many standard errors away from the exact value
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        gx = blk.net(xr)
        tr1 = sum(torch.autograd.grad(gx[:, i].sum(), xr, retain_graph=True)[0][:, i] for i in range(D))
    assert bool(((tr1 - exact).abs() > 5 * se).any()), (tr1, exact, se)


def test_neumann_gradient_is_unbiased():
    blk = _strong_block()
    torch.manual_seed(4)
    x = torch.randn(2, D, dtype=torch.float64)
    params = [blk.net.linears[0].weight, blk.net.linears[-1].weight]

    def grads(estimator, **kw):
        xr = x.repeat(16, 1)
        lad = blk.logabsdet(xr, estimator=estimator, **kw)[1]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(lad.mean(), params)])

    exact = grads("exact")
    draws = torch.stack([grads("roulette", gradient="neumann") for _ in range(40)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - exact).abs() <= 3.5 * se + 1e-10).all()), ((mean - exact) / se)
    # backprop through a long series agrees too (a deterministic check of the same gradient)
    series = torch.stack([grads("series", gradient="backprop", n_terms=30) for _ in range(20)]).mean(0)
    assert float((series - exact).abs().max()) < 0.2 * float(exact.abs().max()) + 1e-6


def test_gradcheck_forward_and_inverse():
    blk = _strong_block(context=2, num_hidden=1)
    blk.atol = blk.rtol = 1e-13
    blk.max_iter = 1000
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: blk(a, b), (x, c))
    assert torch.autograd.gradcheck(lambda a, b: blk.inverse(a, b), (x, c))
    # the implicit gradient of the inverse with respect to a weight, against finite differences
    w = blk.net.linears[0].weight
    w0 = w.detach().clone()

    def f(wv):
        with torch.no_grad():
            w.copy_(wv)
            xi, li = blk.inverse(x.detach(), c.detach())
            return float(xi.sum() + li.sum())

    xi, li = blk.inverse(x.detach(), c.detach())
    (g,) = torch.autograd.grad(xi.sum() + li.sum(), w)
    e = torch.zeros_like(w0)
    e[0, 1] = 1e-6
    fd = (f(w0 + e) - f(w0 - e)) / 2e-6
    f(w0)
    assert abs(float(g[0, 1]) - fd) < 1e-6 * (1 + abs(fd))


def test_bad_arguments_and_empty_batch():
    with pytest.raises(ValueError, match="features"):
        ResidualBlock(0)
    with pytest.raises(ValueError, match="coeff"):
        ResidualBlock(2, coeff=1.0)
    with pytest.raises(ValueError, match="estimator"):
        ResidualBlock(2, estimator="magic")
    blk = ResidualBlock(2)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        blk(torch.randn(3, 4))
    with pytest.raises(ValueError, match="num_layers"):
        build("resflow", (2,), num_layers=0)
    flow = build("resflow", (2,), num_layers=1, hidden_features=8)
    assert flow.log_prob(torch.zeros(0, 2)).shape == (0,)
    flow.eval()
    assert flow.sample(0).shape == (0, 2)
    y, lad = blk(torch.zeros(0, 2))
    assert y.shape == (0, 2) and lad.shape == (0,)


def test_resflow_fit_density_integrates_to_one():
    torch.manual_seed(0)
    train, test = data.load("moons", "train"), data.load("moons", "test")
    flow = build("resflow", (2,), num_layers=2, hidden_features=32, num_hidden=2)
    with torch.no_grad():
        flow(train[::16])  # ActNorm's data init (a strided batch: the first rows are not representative)
    flow.eval()
    with torch.no_grad():
        nll0 = float(-flow.log_prob(test).mean())
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(240):
        idx = torch.randint(0, len(train), (128,), generator=g)
        loss = -flow.log_prob(train[idx]).mean()  # unbiased roulette estimate of the NLL
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gauss_nll = float(-gauss.log_prob(test).mean())
    assert nll < nll0 - 0.2 and nll < gauss_nll - 0.1, (nll0, nll, gauss_nll)
    lim, n = 7.0, 160
    grid = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp()
    mass = float(p.sum() * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1.0) < 0.02, mass
    # samples (fixed-point inverses of all blocks) carry their own log-density
    with torch.no_grad():
        xs, lps = flow.sample_and_log_prob(64)
        torch.testing.assert_close(lps, flow.log_prob(xs), rtol=1e-3, atol=1e-3)


def test_conditional_resflow_samples_carry_their_log_density():
    torch.manual_seed(0)
    flow = build("resflow", (2,), context_features=3, num_layers=2, hidden_features=8, atol=1e-12, rtol=1e-12).double()
    with torch.no_grad():
        flow(torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64))  # ActNorm init
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow.eval()
    ctx = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        xs, lps = flow.sample_and_log_prob(5, ctx)
        assert xs.shape == (2, 5, 2) and lps.shape == (2, 5)
        flat = flow.log_prob(xs.reshape(-1, 2), ctx.repeat_interleave(5, 0))
        torch.testing.assert_close(flat, lps.reshape(-1), rtol=1e-6, atol=1e-6)
        other = flow.log_prob(xs.reshape(-1, 2), ctx.flip(0).repeat_interleave(5, 0))
    assert float((other - flat).abs().max()) > 1e-3  # the context matters
