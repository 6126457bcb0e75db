"""Every layer: inverse round trip, log-det against the naive Jacobian slogdet, gradcheck,
context conditioning, identity at initialisation where promised."""

from __future__ import annotations

import pytest
import torch

import fastflow.nn as fnn
from fastflow import UnknownBackendError
from fastflow.testing import jacobian_logabsdet

CTX = 3


def _perturb(layer, scale=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _bn():
    layer = fnn.BatchNormFlow(5)
    layer.running_mean.copy_(torch.randn(5))
    layer.running_var.copy_(torch.rand(5) + 0.5)
    return layer


def _odd_channels(c, h, w):
    return (torch.arange(c) % 2 == 1)[:, None, None].expand(c, h, w).clone()


# name -> (factory, event shape, takes context)
CASES = {
    "affine-half": (lambda c: fnn.AffineCoupling(fnn.half_mask(5), context_features=c, hidden_features=8), (5,)),
    "affine-exp": (lambda c: fnn.AffineCoupling(fnn.alternating_mask(5), context_features=c, scale="exp",
                                                hidden_features=8), (5,)),
    "affine-sigmoid": (lambda c: fnn.AffineCoupling(fnn.alternating_mask(5, 1), context_features=c,
                                                    scale="sigmoid", hidden_features=8), (5,)),
    "affine-resmlp": (lambda c: fnn.AffineCoupling(fnn.half_mask(4, flip=True), "resmlp", context_features=c,
                                                   hidden_features=8, num_blocks=1), (4,)),
    "affine-checkerboard": (lambda c: fnn.AffineCoupling(fnn.checkerboard_mask(2, 4, 4), "resnet",
                                                         context_features=c, hidden_channels=8, num_blocks=1),
                            (2, 4, 4)),
    "affine-channel": (lambda c: fnn.AffineCoupling(fnn.channel_mask(4, 2, 2), context_features=c,
                                                    hidden_channels=8), (4, 2, 2)),
    # channels 1 and 3 of 4 transformed: not contiguous ranges, so gathered and scattered
    "affine-channel-gather": (lambda c: fnn.AffineCoupling(_odd_channels(4, 2, 3), context_features=c,
                                                           scale="sigmoid", hidden_channels=8), (4, 2, 3)),
    "additive-channel-flip": (lambda c: fnn.AdditiveCoupling(fnn.channel_mask(4, 3, 2, flip=True),
                                                             context_features=c, hidden_channels=8), (4, 3, 2)),
    "additive": (lambda c: fnn.AdditiveCoupling(fnn.alternating_mask(5), context_features=c, hidden_features=8),
                 (5,)),
    "additive-checkerboard": (lambda c: fnn.AdditiveCoupling(fnn.checkerboard_mask(1, 4, 4, 1), context_features=c,
                                                             hidden_channels=8), (1, 4, 4)),
    "rescale": (lambda c: fnn.Rescale(5), (5,)),
    "spline": (lambda c: fnn.RQSplineCoupling(fnn.alternating_mask(5), context_features=c, num_bins=4,
                                              tail_bound=2.0, hidden_features=8), (5,)),
    "spline-image": (lambda c: fnn.RQSplineCoupling(fnn.channel_mask(2, 2, 2), context_features=c, num_bins=3,
                                                    hidden_channels=8), (2, 2, 2)),
    "maf": (lambda c: fnn.MaskedAffineAutoregressive(4, 16, 2, c), (4,)),
    "maf-order": (lambda c: fnn.MaskedAffineAutoregressive(4, 16, 1, c, order=[2, 0, 3, 1], scale="exp"), (4,)),
    "iaf": (lambda c: fnn.InverseAutoregressive(4, hidden_features=16, context_features=c), (4,)),
    "nsf-ar": (lambda c: fnn.MaskedRQAutoregressive(4, 16, 2, c, num_bins=4, tail_bound=2.0), (4,)),
    "bernstein-ar": (lambda c: fnn.MaskedAutoregressive(4, fnn.BernsteinLaw(5, 2.5), 16, 2, c), (4,)),
    "sos-ar": (lambda c: fnn.MaskedAutoregressive(4, fnn.SOSLaw(2, 3), 16, 2, c), (4,)),
    "softclip": (lambda c: fnn.Softclip(3.0), (4,)),
    # (angles: the inputs below, torch.randn under the suite's seed, all lie in [-pi, pi))
    "circular-ar": (lambda c: fnn.MaskedAutoregressive(4, fnn.CircularSplineLaw(5), 16, 2, c), (4,)),
    "circular-coupling": (lambda c: fnn.Coupling(fnn.alternating_mask(5), law="circular", context_features=c,
                                                 hidden_features=8), (5,)),
    "circular-wrap": (lambda c: fnn.CircularWrap(), (4,)),
    "bernstein-coupling": (lambda c: fnn.Coupling(fnn.alternating_mask(5), law=fnn.BernsteinLaw(4, 2.0),
                                                  context_features=c, hidden_features=8), (5,)),
    "actnorm": (lambda c: fnn.ActNorm(3).eval(), (3, 2, 2)),
    "actnorm-vector": (lambda c: fnn.ActNorm(4).eval(), (4,)),
    "invconv": (lambda c: fnn.InvConv1x1(3), (3, 2, 2)),
    "lulinear": (lambda c: fnn.LULinear(4), (4,)),
    "actnorm-invconv": (lambda c: fnn.ActNormInvConv1x1(3).eval(), (3, 2, 2)),
    "squeeze": (lambda c: fnn.Squeeze(), (2, 4, 4)),
    "reverse": (lambda c: fnn.ReversePermutation(4), (4,)),
    "random-perm": (lambda c: fnn.RandomPermutation(4, seed=3), (4,)),
    "batchnorm-eval": (lambda c: _bn().eval(), (5,)),
    "cholesky": (lambda c: fnn.CholeskyAffine(4), (4,)),
    "mixture": (lambda c: fnn.MixtureLogisticCDF(3, 3, context_features=c, hidden_features=8), (3,)),
    "composite": (lambda c: fnn.CompositeTransform([
        fnn.AffineCoupling(fnn.half_mask(4), context_features=c, hidden_features=8), fnn.LULinear(4),
        fnn.RQSplineCoupling(fnn.half_mask(4, True), context_features=c, num_bins=3, hidden_features=8),
    ]), (4,)),
    "multiscale": (lambda c: fnn.MultiScale(
        [fnn.CompositeTransform([fnn.Squeeze(), fnn.AffineCoupling(fnn.channel_mask(4, 2, 2), context_features=c,
                                                                   hidden_channels=8)]),
         fnn.CompositeTransform([fnn.Squeeze(), fnn.InvConv1x1(8)])],
        [(4, 2, 2), (8, 1, 1)]), (1, 4, 4)),
}
CONDITIONAL = {"affine-half", "affine-resmlp", "affine-checkerboard", "affine-channel", "affine-channel-gather",
               "additive-channel-flip", "additive",
               "additive-checkerboard", "spline", "spline-image", "maf", "iaf", "nsf-ar", "bernstein-ar", "sos-ar",
               "bernstein-coupling", "circular-ar", "circular-coupling", "mixture", "composite",
               "multiscale"}


def _make(name, dtype=torch.float64, b=3):
    factory, shape = CASES[name]
    c = CTX if name in CONDITIONAL else None
    layer = _perturb(factory(c).to(dtype))
    x = torch.randn(b, *shape, dtype=dtype)
    ctx = torch.randn(b, CTX, dtype=dtype) if c else None
    return layer, x, ctx


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name):
    layer, x, ctx = _make(name, b=7)
    y, lad = layer(x, context=ctx)
    assert lad.shape == (7,)
    x2, lad_inv = layer.inverse(y, context=ctx)
    torch.testing.assert_close(x2, x, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logdet_matches_jacobian(name):
    layer, x, ctx = _make(name)
    _, lad = layer(x, context=ctx)

    def fn(v):
        # each sample with its own context row: the oracle evaluates one sample at a time
        return layer(v, context=None if ctx is None else ctx[fn.i : fn.i + 1])[0].reshape(v.shape[0], -1)

    expected = []
    for i in range(x.shape[0]):
        fn.i = i
        expected.append(jacobian_logabsdet(fn, x[i : i + 1]))
    torch.testing.assert_close(lad, torch.cat(expected), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inverse_logdet_matches_jacobian(name):
    layer, x, ctx = _make(name, b=2)
    y = layer(x, context=ctx)[0].detach()
    _, lad = layer.inverse(y, context=ctx)
    for i in range(2):
        c = None if ctx is None else ctx[i : i + 1]
        ref = jacobian_logabsdet(lambda v: layer.inverse(v, context=c)[0], y[i : i + 1])
        torch.testing.assert_close(lad[i : i + 1], ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    layer, x, ctx = _make(name, b=2)
    x = x.requires_grad_()
    inputs = (x,) if ctx is None else (x, ctx.requires_grad_())

    def f(*args):
        y, lad = layer(args[0], context=args[1] if len(args) > 1 else None)
        return y, lad

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    y = layer(x, context=ctx)[0].detach().requires_grad_()
    inv_inputs = (y,) if ctx is None else (y, ctx)

    def g(*args):
        return layer.inverse(args[0], context=args[1] if len(args) > 1 else None)

    assert torch.autograd.gradcheck(g, inv_inputs, eps=1e-6, atol=1e-5)


PARAMETER_FREE = {"squeeze", "reverse", "random-perm", "softclip", "circular-wrap"}


@pytest.mark.parametrize("name", sorted(set(CASES) - PARAMETER_FREE))
def test_parameters_get_gradients(name):
    layer, x, ctx = _make(name, dtype=torch.float32, b=4)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert params
    y, lad = layer(x, context=ctx)
    (y.square().sum() + lad.sum()).backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_context_changes_output(name):
    layer, x, ctx = _make(name)
    y1, l1 = layer(x, context=ctx)
    y2, l2 = layer(x, context=ctx + 1.0)
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("name", ["affine-half", "affine-checkerboard", "affine-channel", "additive", "spline",
                                  "spline-image", "maf", "nsf-ar"])
def test_fresh_layer_is_identity(name):
    factory, shape = CASES[name]
    layer = factory(None).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y, lad = layer(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(lad, torch.zeros(5, dtype=torch.float64))


def test_param_gradcheck_spline_and_mixture():
    # gradients w.r.t. parameters through the fused spline op and through the implicit inverse
    torch.manual_seed(0)
    sp = _perturb(fnn.RQSplineCoupling(fnn.half_mask(3), num_bins=3, hidden_features=4).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    w = sp.net.net[-1].weight

    def f(weight):
        return torch.func.functional_call(sp, {"net.net.4.weight": weight}, (x,))

    assert torch.autograd.gradcheck(f, (w.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)

    mix = _perturb(fnn.MixtureLogisticCDF(2, 3).double())
    y = torch.randn(5, 2, dtype=torch.float64)
    names = ["logits", "means", "log_scales"]

    class _Inv(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, v):
            return self.m.inverse(v)

    inv = _Inv(mix)

    def g(*ps):
        return torch.func.functional_call(inv, {f"m.{n}": p for n, p in zip(names, ps)}, (y,))

    assert torch.autograd.gradcheck(g, tuple(getattr(mix, n).detach().clone().requires_grad_() for n in names),
                                    eps=1e-6, atol=1e-5)


def test_actnorm_data_init():
    x = 3.0 + 2.0 * torch.randn(64, 3, 4, 4)
    for layer in (fnn.ActNorm(3), fnn.ActNormInvConv1x1(3, identity_init=True)):
        y, _ = layer(x)
        torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
        assert bool(layer.initialized)
        before = [p.detach().clone() for p in layer.parameters()]
        layer(x + 5.0)  # second call: no re-initialisation
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
        # a state dict carries the flag: the loaded layer does not re-initialise on new data
        fresh = type(layer)(3)
        fresh.load_state_dict(layer.state_dict())
        y2, _ = fresh(x)
        torch.testing.assert_close(y2, y)


def test_batchnorm_train_mode_normalises_and_updates():
    bn = fnn.BatchNormFlow(3)
    x = 2.0 + 3.0 * torch.randn(256, 3)
    y, lad = bn(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert bool((bn.running_mean > 0.1).all())
    expected = -0.5 * torch.log(x.var(0, unbiased=False) + bn.eps).sum()
    torch.testing.assert_close(lad, expected.expand(256))


def test_made_is_autoregressive():
    made = _perturb(fnn.MADE(5, 2, 16, 2, order=[3, 1, 4, 0, 2]).double())
    x = torch.randn(1, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: made(v).reshape(-1, 2).sum(-1), x).reshape(5, 5)
    order = torch.tensor([3, 1, 4, 0, 2])
    allowed = order[None, :] < order[:, None]  # output d may depend on input j iff order[j] < order[d]
    assert bool((jac[~allowed] == 0).all())
    assert bool((jac[allowed] != 0).any())


def test_cholesky_affine_is_gaussian():
    from fastflow.flows import Flow, StandardNormal

    layer = _perturb(fnn.CholeskyAffine(3).double())
    flow = Flow(layer, StandardNormal(3)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    scale_tril = layer.scale_tril()
    ref = torch.distributions.MultivariateNormal(layer.loc, scale_tril=scale_tril).log_prob(x)
    torch.testing.assert_close(flow.log_prob(x), ref)


def test_mixture_inverse_extreme_values():
    layer = _perturb(fnn.MixtureLogisticCDF(2, 4))
    y = torch.tensor([[-30.0, 30.0], [0.0, 1e-3], [15.0, -15.0]])
    x, _ = layer.inverse(y)
    y2, _ = layer(x)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mask"):
        fnn.AffineCoupling(torch.ones(4, dtype=torch.bool))
    layer = fnn.AffineCoupling(fnn.half_mask(4), hidden_features=8)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="context"):
        fnn.AffineCoupling(fnn.half_mask(4), context_features=2, hidden_features=8)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="scale"):
        fnn.AffineCoupling(fnn.half_mask(4), scale="tanh")
    with pytest.raises(ValueError, match="even"):
        fnn.Squeeze()(torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize("name", ["affine-channel", "additive-channel-flip", "spline-image"])
def test_channel_ranges_equal_the_gather_path(name):
    """Channel halves read as views and joined by cat give exactly what gathering and
    scattering them by index gives (outputs, inverse and every gradient)."""
    layer, x, ctx = _make(name, b=5)
    assert layer._ranges is not None

    def run(inverse):
        xi = x.detach().clone().requires_grad_()
        layer.zero_grad()
        y, lad = (layer.inverse if inverse else layer)(xi, context=ctx)
        (y.square().sum() + lad.sum()).backward()
        return [y, lad, xi.grad] + [p.grad.clone() for p in layer.parameters()]

    for inverse in (False, True):
        fast = run(inverse)
        ranges, layer._ranges = layer._ranges, None
        try:
            slow = run(inverse)
        finally:
            layer._ranges = ranges
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- laws x structures


def test_any_law_in_any_structure():
    """Coupling(mask, law) and MaskedAutoregressive(features, law) with each law: round trip, the
    log-det against the naive Jacobian, and the named classes are these with their law."""
    from fastflow.nn import (AdditiveLaw, AffineCoupling, AffineLaw, Coupling, MaskedAutoregressive,
                             RQSplineCoupling, SplineLaw, alternating_mask, make_law)

    g = torch.Generator().manual_seed(0)
    for law in (AffineLaw("exp"), AffineLaw("sigmoid"), AdditiveLaw(), SplineLaw(num_bins=5), "spline", "affine"):
        for layer in (Coupling(alternating_mask(5, 1), law=law, hidden_features=8),
                      MaskedAutoregressive(5, make_law(law) if isinstance(law, str) else law, hidden_features=8)):
            layer = layer.double()
            with torch.no_grad():
                for p in layer.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            x = torch.randn(6, 5, generator=g, dtype=torch.float64)
            y, lad = layer(x)
            xr, lad_inv = layer.inverse(y)
            torch.testing.assert_close(xr, x, rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(lad_inv, -lad, rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(lad, jacobian_logabsdet(lambda t: layer(t)[0], x), rtol=1e-8, atol=1e-8)
            if not isinstance(law, AdditiveLaw):
                assert (y - x).abs().max() > 1e-3  # the law acted
    with pytest.raises(ValueError, match="unknown law"):
        Coupling(alternating_mask(4, 0), law="quadratic")
    with pytest.raises(TypeError, match="law must be"):
        MaskedAutoregressive(4, law=3)
    assert RQSplineCoupling(alternating_mask(4, 0), num_bins=6).law.params_per_element == 17
    assert AffineCoupling(alternating_mask(4, 0), scale="exp").scale == "exp"


@pytest.mark.parametrize("make,shape", [
    (lambda be: fnn.InvConv1x1(4, backend=be), (2, 4, 3, 3)),
    (lambda be: fnn.LULinear(4, backend=be), (2, 4)),
    (lambda be: fnn.ActNormInvConv1x1(4, backend=be), (2, 4, 3, 3)),
])
def test_lu_layers_pass_backend_through(make, shape):
    """A forced backend reaches the op (forward and inverse): an unknown one is refused there,
    and the reference oracle agrees with the default backend."""
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(UnknownBackendError, match="fortran"):
        make("fortran")(x.float())
    torch.manual_seed(0)
    ref = make("reference").double()
    torch.manual_seed(0)
    default = make(None).double()
    y_ref, lad_ref = ref(x)
    y, lad = default(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(lad, lad_ref)
    torch.testing.assert_close(ref.inverse(y_ref)[0], x)
