"""torch.func over whole models: one registered model per structure (spline and affine couplings,
additive couplings with rescale, masked autoregressive, Glow's LU and ActNorm steps), on the
fused backends, against plain reverse mode on the reference backend. Issue 25: ``grad``/``jacrev``
through the fused ops returned zeros or missed paths; the per-op checks live in the conformance
suite, this proves the models compose."""

from __future__ import annotations

import pytest
import torch

from tests.flows.test_flows import _flow

MODELS = ["nsf", "realnvp", "nice", "maf", "nsf-ar", "bpf", "sospf", "ncsf", "glow"]


def _reference_copy(flow, name):
    from fastflow.flows import build

    ref = build(**{**flow.spec, "kwargs": {**flow.spec.get("kwargs", {}), "backend": "reference"}}) \
        if "backend" in _build_kwargs(name) else None
    if ref is None:
        return None
    ref = ref.to(torch.float64)
    ref.load_state_dict(flow.state_dict())
    return ref.eval()


def _build_kwargs(name):
    import inspect

    from fastflow.flows import models

    return inspect.signature(models._REGISTRY[name]).parameters


def _plain_grad_and_jacobian(flow, x, context):
    xx = x.clone().requires_grad_()
    lp = flow.log_prob(xx, context)
    (g,) = torch.autograd.grad(lp.sum(), xx, retain_graph=True)
    rows = [torch.autograd.grad(lp[i], xx, retain_graph=True)[0] for i in range(lp.shape[0])]
    return g, torch.stack(rows)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("context", [None, 2])
def test_func_transforms_of_log_prob(name, context):
    flow, shape = _flow(name, context)
    b = 3
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    ctx = torch.randn(b, context, generator=gen, dtype=torch.float64) if context else None
    want_g, want_j = _plain_grad_and_jacobian(flow, x, ctx)
    ref = _reference_copy(flow, name)
    if ref is not None:  # the same weights on the reference backend: the oracle's numbers
        ref_g, ref_j = _plain_grad_and_jacobian(ref, x, ctx)
        torch.testing.assert_close(want_g, ref_g, rtol=1e-9, atol=1e-9)
    assert float(want_g.abs().max()) > 0

    def total(v):
        return flow.log_prob(v, ctx).sum()

    torch.testing.assert_close(torch.func.grad(total)(x), want_g, rtol=1e-9, atol=1e-9)
    _, vjp_fn = torch.func.vjp(lambda v: flow.log_prob(v, ctx), x)
    torch.testing.assert_close(vjp_fn(torch.ones(b, dtype=torch.float64))[0], want_g, rtol=1e-9, atol=1e-9)
    jr = torch.func.jacrev(lambda v: flow.log_prob(v, ctx))(x)
    torch.testing.assert_close(jr, want_j, rtol=1e-9, atol=1e-9)
    jf = torch.func.jacfwd(lambda v: flow.log_prob(v, ctx))(x)
    torch.testing.assert_close(jf, want_j, rtol=1e-9, atol=1e-9)
    # per-sample gradients, the usual vmap(grad) idiom
    if ctx is None:
        per = torch.func.vmap(torch.func.grad(lambda v: flow.log_prob(v[None])[0]))(x)
    else:
        per = torch.func.vmap(torch.func.grad(lambda v, c: flow.log_prob(v[None], c[None])[0]))(x, ctx)
    torch.testing.assert_close(per, want_g, rtol=1e-9, atol=1e-9)
