"""Planar and radial flows: the invertibility constraints hold for any raw parameters, the closed-form
(noise -> data) log-det equals the slogdet of the autograd Jacobian, the numerical inverse
round-trips and its log-det and gradients (implicit, for planar) are right, ``inverse="refuse"``
refuses, and after a reverse-KL fit the importance-sampling estimate of a known normaliser equals
it and the density integrates to one on a grid."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.flows import build, reverse_kl_step
from fastflow.nn.planar import PlanarFlow, RadialFlow
from fastflow.testing import jacobian_logabsdet

CLASSES = [PlanarFlow, RadialFlow]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _layer(cls, d=3, scale=1.5, seed=0):
    torch.manual_seed(seed)
    layer = cls(d).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("seed", range(5))
def test_invertibility_constraints(seed):
    planar = _layer(PlanarFlow, scale=4.0, seed=seed)
    with torch.no_grad():
        planar.u.copy_(-5.0 * planar.w)  # w^T u << -1: the raw parameters violate the condition
    assert float((planar.w @ planar.u_hat()).detach()) > -1.0
    radial = _layer(RadialFlow, scale=4.0, seed=seed)
    with torch.no_grad():
        radial.beta_raw.fill_(-30.0)  # beta -> -alpha, the boundary
    alpha, beta = (t.detach() for t in radial.alpha_beta())
    assert float(alpha) > 0 and float(beta) >= -float(alpha)
    z = torch.randn(200, 3, dtype=torch.float64) * 3
    for layer in (planar, radial):
        lad = layer.inverse(z)[1]
        assert bool(torch.isfinite(lad).all())


@pytest.mark.parametrize("cls", CLASSES)
def test_closed_form_logdet_and_numerical_inverse(cls):
    layer = _layer(cls)
    z = torch.randn(6, 3, dtype=torch.float64)
    x, lad = layer.inverse(z)
    ref = torch.cat([jacobian_logabsdet(lambda v: layer.inverse(v)[0], z[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(lad.detach(), ref, rtol=1e-10, atol=1e-10)
    assert float(lad.detach().abs().max()) > 0.1
    zr, flad = layer(x)
    torch.testing.assert_close(zr, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(flad, -lad, rtol=0, atol=1e-10)
    ref_f = torch.cat([jacobian_logabsdet(lambda v: layer(v)[0], x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(flad.detach(), ref_f, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", CLASSES)
def test_gradcheck_both_directions_and_parameters(cls):
    layer = _layer(cls)
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer.inverse(v), (z,))
    x = layer.inverse(z)[0].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))
    # parameter gradients of the numerical inverse (planar: the implicit gradient of the root)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def f(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x.detach(),))

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_refuse_mode_and_bad_arguments(name):
    flow = build(name, (2,), num_layers=2, inverse="refuse")
    x, lq = flow.sample_and_log_prob(4)  # the closed-form direction still works
    assert x.shape == (4, 2) and lq.shape == (4,)
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="num_layers"):
        build(name, (2,), num_layers=0)
    with pytest.raises(ValueError, match="unconditional"):
        build(name, (2,), context_features=3)
    with pytest.raises(ValueError, match="inverse"):
        build(name, (2,), inverse="maybe")
    flow = build(name, (2,), num_layers=2)
    assert flow.log_prob(torch.zeros(0, 2)).shape == (0,)
    assert flow.sample(0).shape == (0, 2)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        flow.transform[0](torch.zeros(3, 5))


@pytest.mark.parametrize("name,steps", [("planar", 300), ("radial", 300)])
def test_importance_sampling_recovers_known_normaliser(name, steps):
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -1.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]]) if name == "planar" else 0.5 * torch.eye(2)
    target = torch.distributions.MultivariateNormal(mean, cov)
    log_z = 3.7

    def log_p(x):  # unnormalised on purpose: its integral is exp(log_z)
        return target.log_prob(x) + log_z

    flow = build(name, (2,), num_layers=8)
    opt = torch.optim.Adam(flow.parameters(), 1e-2)
    for _ in range(steps):
        reverse_kl_step(flow, opt, log_p, 256)
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(20000)
        log_w = log_p(x) - log_q
        w = torch.exp(log_w - log_w.max())
        z_hat = float(w.mean()) * math.exp(float(log_w.max()))
        rel_se = float(w.std() / w.mean()) / math.sqrt(w.numel())
        kl = float((log_q - target.log_prob(x)).mean())
    print(f"{name}: log Z estimate {math.log(z_hat):.4f} (true {log_z}), relative SE {rel_se:.4f}, KL {kl:.4f}")
    assert rel_se < 0.03, rel_se  # the fit is good enough for the check to have power
    assert abs(z_hat / math.exp(log_z) - 1.0) < 3 * rel_se, (math.log(z_hat), rel_se)
    # log_prob of the samples through the numerical inverse is the density they were drawn with
    torch.testing.assert_close(flow.log_prob(x[:500]).detach(), log_q[:500], rtol=1e-4, atol=1e-4)
    # and that density integrates to one on a grid
    lim, n = 7.0, 200
    grid = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = float(flow.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1.0) < 0.01, mass
