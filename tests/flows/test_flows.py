"""Flow, base distributions, the model registry: log-det against the naive Jacobian, density
normalisation on a grid, sampling consistency, checkpoint round trip, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import fastflow
from fastflow.flows import DiagonalNormal, Flow, StandardLogistic, StandardNormal, build, names
from fastflow.testing import jacobian_logabsdet
from tests.flows._autocast_models import IMAGE
from tests.flows._autocast_models import SMALL as ALL_SMALL

# the closed-form models' small configurations (shared with the compile, autocast and export tests)
SMALL = {k: v for k, v in ALL_SMALL.items() if k in ("nsf", "realnvp", "nice", "maf", "iaf", "nsf-ar", "bpf", "sospf",
                                                     "ncsf", "glow", "realnvp-image")}


def _perturb(module, scale=0.2):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _flow(name, context=None, dtype=torch.float64, shape=None):
    shape = shape or ((1, 4, 4) if name in IMAGE else (3,))
    flow = build(name, shape, context, **SMALL[name])
    return _perturb(flow.to(dtype)).eval(), shape


def test_registry_names():
    assert {"nsf", "realnvp", "nice", "maf", "iaf", "nsf-ar", "glow"} <= set(names())
    with pytest.raises(ValueError, match="unknown flow"):
        build("vae", (2,))
    with pytest.raises(TypeError):
        build("nsf", (2,), bogus=1)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("context", [None, 2])
def test_log_prob_matches_jacobian_and_samples(name, context):
    flow, shape = _flow(name, context)
    b = 2
    x = torch.randn(b, *shape, dtype=torch.float64)
    ctx = torch.randn(b, context, dtype=torch.float64) if context else None
    lp = flow.log_prob(x, ctx)
    assert lp.shape == (b,)
    # oracle: base log-density of T(x) plus the slogdet of the autograd Jacobian of T
    for i in range(b):
        c = None if ctx is None else ctx[i : i + 1]
        xi = x[i : i + 1]
        z = flow.transform_to_noise(xi, c)
        jac = jacobian_logabsdet(lambda v: flow.transform_to_noise(v, c), xi)
        torch.testing.assert_close(lp[i : i + 1], flow.base.log_prob(z) + jac, rtol=1e-7, atol=1e-7)
    # samples invert to their noise and carry their own log-density
    xs, lps = flow.sample_and_log_prob(3, ctx)
    expected_shape = (b, 3, *shape) if ctx is not None else (3, *shape)
    assert xs.shape == expected_shape
    flat_x = xs.reshape(-1, *shape)
    flat_c = None if ctx is None else ctx.repeat_interleave(3, 0)
    torch.testing.assert_close(lps.reshape(-1), flow.log_prob(flat_x, flat_c), rtol=1e-6, atol=1e-6)


# (not ncsf, a density on the torus: its own test below; not sospf: as zuko's SOSPF, its Softclip
# between layers maps the line onto (-11, 11), so the latent image is bounded and the density
# integrates to the base's mass there, below 1)
@pytest.mark.parametrize("name", ["nsf", "realnvp", "nice", "maf", "iaf", "nsf-ar", "bpf"])
def test_2d_density_integrates_to_one(name):
    flow, _ = _flow(name, shape=(2,))
    lim, n = 9.0, 400
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp()
    cell = (g[1] - g[0]) ** 2
    mass = float(p.sum() * cell)
    assert abs(mass - 1.0) < 1e-2, mass


def test_ncsf_density_integrates_to_one_on_the_torus():
    """A density of angles: mass 1 over [-pi, pi)^2 (midpoint rule), the same log-density one
    turn away, samples inside [-pi, pi)."""
    flow, _ = _flow("ncsf", shape=(2,))
    n = 400
    g = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n) - math.pi
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        lp = flow.log_prob(pts)
        mass = float(lp.exp().sum() * (2 * math.pi / n) ** 2)
        assert abs(mass - 1.0) < 1e-2, mass
        torch.testing.assert_close(flow.log_prob(pts + torch.tensor([2 * math.pi, -6 * math.pi],
                                                                    dtype=torch.float64)), lp, rtol=0, atol=1e-8)
        xs = flow.sample(2000)
    assert float(xs.min()) >= -math.pi and float(xs.max()) < math.pi
    with pytest.raises(ValueError, match="a linear mixer would leave the torus"):
        build("ncsf", (2,), permutation="lu")


def test_checkpoint_rebuild_and_json_spec():
    import json

    flow, shape = _flow("nsf", context=2, dtype=torch.float32)
    spec = json.loads(json.dumps(flow.spec))
    assert spec["name"] == "nsf" and tuple(spec["shape"]) == shape and spec["context_features"] == 2
    other = build(**spec)
    other.load_state_dict(flow.state_dict())
    other.eval()
    x, c = torch.randn(5, *shape), torch.randn(5, 2)
    torch.testing.assert_close(other.log_prob(x, c), flow.log_prob(x, c))
    assert fastflow.build is build and fastflow.Flow is Flow


@pytest.mark.parametrize("name", ["nsf", "glow", "maf", "bpf", "sospf", "ncsf"])
def test_compile_fullgraph_log_prob(name):
    torch._dynamo.reset()
    flow, shape = _flow(name, dtype=torch.float32)
    x = torch.randn(8, *shape)
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, flow.log_prob(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()


@pytest.mark.parametrize("base", [StandardNormal((2, 3)), DiagonalNormal((2, 3)), StandardLogistic((2, 3))])
def test_base_distributions(base):
    _perturb(base)
    z, lp = base.sample_and_log_prob(20000)
    assert z.shape == (20000, 2, 3)
    torch.testing.assert_close(lp, base.log_prob(z))
    ref = {
        StandardNormal: lambda: torch.distributions.Normal(0.0, 1.0),
        StandardLogistic: lambda: torch.distributions.TransformedDistribution(
            torch.distributions.Uniform(0.0, 1.0),
            [torch.distributions.SigmoidTransform().inv]),
        DiagonalNormal: lambda: torch.distributions.Normal(base.loc, base.log_scale.exp()),
    }[type(base)]()
    torch.testing.assert_close(lp, ref.log_prob(z).reshape(20000, -1).sum(1), rtol=1e-4, atol=1e-4)
    # Monte Carlo: E[-log p] is the entropy; compare with the reference's entropy where known
    if isinstance(base, (StandardNormal, DiagonalNormal)):
        ent = (float(ref.entropy().sum().detach()) if isinstance(base, DiagonalNormal)
               else 6 * 0.5 * math.log(2 * math.pi * math.e))
        assert abs(float(-lp.detach().mean()) - ent) < 0.1


def test_diagonal_normal_samples_are_reparameterised():
    base = DiagonalNormal(2)
    z, lp = base.sample_and_log_prob(64)
    (z.sum() + lp.sum()).backward()
    assert base.loc.grad is not None and base.log_scale.grad is not None
