"""Whole-model compilation (``fastflow.compile``, issue 27).

For every registered model, with and without context: ``log_prob``, ``sample_and_log_prob`` and
the training loss (forward and backward) trace to ONE graph with zero breaks
(``torch._dynamo.explain``) unless the model declares a data-dependent loop
(``graph_breaks``: planar/radial's numerical inverse, resflow's estimator and fixed point, cnf's
ODE solve), and the compiled methods give the eager model's numbers: log-densities, a training
step's loss and updated parameters, and samples drawn from the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import fastflow
from fastflow.flows import adam, eager_parts
from tests.flows._autocast_models import UNCONDITIONAL_ONLY, data, registered, small_flow

CASES = [(name, ctx) for name in registered() for ctx in ((None,) if name in UNCONDITIONAL_ONLY else (None, 3))]
ITERATIVE = {"planar", "radial", "resflow", "cnf"}


def _inputs(name, ctx, n=16):
    x = data(name, n)
    c = torch.randn(n, ctx, generator=torch.Generator().manual_seed(5)) if ctx else None
    return x, c


def _explain(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name,ctx", CASES)
def test_every_model_traces_to_one_graph(name, ctx):
    flow = small_flow(name, ctx)
    x, c = _inputs(name, ctx)
    parts = eager_parts(flow)
    assert bool(parts) == (name in ITERATIVE), f"{name}: declared eager parts {parts}"
    cases = {"log_prob": (flow.log_prob, (x, c)), "sample_and_log_prob": (flow.sample_and_log_prob, (5, c)),
             "loss": (flow.forward_kl, (x, c))}
    for what, (fn, args) in cases.items():
        e = _explain(fn, *args)
        if not parts:
            assert (e.graph_count, e.graph_break_count) == (1, 0), (
                f"{name} {what}: {e.graph_count} graphs, breaks: {[str(r.reason)[:200] for r in e.break_reasons]}")
        else:  # the declared loops (torch.compiler.disable'd) break the graph, and nothing else does
            other = [str(r.reason)[:200] for r in e.break_reasons if "disable" not in str(r.reason).lower()]
            assert not other, (name, what, other)


def _assert_same_step(name, flow, fast, x, c):
    """One training step eager and compiled from the same weights: the same loss and parameters
    (plain SGD: Adam's first step moves every parameter by about +-lr whatever its gradient's
    size, so it would amplify rounding in gradients that are zero up to rounding)."""
    ref = copy.deepcopy(flow)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-2)
    opt = torch.optim.SGD(flow.parameters(), lr=1e-2)
    torch.manual_seed(11)
    opt_ref.zero_grad()
    loss_ref = ref.forward_kl(x, c)
    loss_ref.backward()
    opt_ref.step()
    torch.manual_seed(11)
    loss = fast.train_step(opt, x, c)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-4, atol=1e-4)
    for (pn, p), q in zip(flow.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {pn}: {m}")


@pytest.mark.parametrize("name,ctx", CASES)
def test_compiled_methods_match_eager(name, ctx):
    """``fastflow.compile`` with the ``aot_eager`` backend (dynamo + AOTAutograd, no code
    generation): the compiled graphs' numbers, quickly, for every model."""
    torch._dynamo.reset()
    flow = small_flow(name, ctx)
    flow.eval() if name in ITERATIVE else flow.train()
    x, c = _inputs(name, ctx)
    fast = fastflow.compile(flow, backend="aot_eager")
    assert fast.fullgraph == (name not in ITERATIVE)
    with torch.no_grad():
        torch.manual_seed(3)
        want = flow.log_prob(x, c)
        torch.manual_seed(3)
        got = fast.log_prob(x, c)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cs = None if c is None else c[:2]
    torch.manual_seed(7)
    xs, lp = flow.sample_and_log_prob(4, cs)
    torch.manual_seed(7)
    xs2, lp2 = fast.sample_and_log_prob(4, cs)
    torch.testing.assert_close(xs2, xs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp2, lp, rtol=1e-4, atol=1e-3)
    torch.manual_seed(7)
    torch.testing.assert_close(fast.sample(4, cs), xs, rtol=1e-4, atol=1e-4)
    if name not in ITERATIVE:  # a stochastic estimator / adaptive solver: not bitwise repeatable steps
        _assert_same_step(name, flow, fast, x, c)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["nsf", "realnvp"])
def test_inductor_train_steps_match_eager(name):
    """The default backend (inductor, generated C++): five training steps and sampling match the
    eager model run side by side from the same weights."""
    torch._dynamo.reset()
    flow = small_flow(name)
    ref = copy.deepcopy(flow)
    fast = fastflow.compile(flow)
    x, _ = _inputs(name, None, 64)
    opt, opt_ref = adam(flow.parameters(), lr=1e-2), adam(ref.parameters(), lr=1e-2)
    for _ in range(5):
        loss = fast.train_step(opt, x)
        opt_ref.zero_grad()
        loss_ref = ref.forward_kl(x)
        loss_ref.backward()
        opt_ref.step()
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-4, atol=1e-4)
    for p, q in zip(flow.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    torch.manual_seed(2)
    want = ref.sample(32)
    torch.manual_seed(2)
    torch.testing.assert_close(fast.sample(32), want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_compile_refuses_bad_arguments():
    flow = small_flow("nsf")
    with pytest.raises(TypeError, match="fastflow Flow"):
        fastflow.compile(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        fastflow.compile(flow, mode="fast")
    with pytest.raises(ValueError, match="run eagerly"):
        fastflow.compile(small_flow("planar"), fullgraph=True)
    fast = fastflow.compile(flow, backend="aot_eager")
    for n in (-1, 2.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            fast.sample(n)


def test_adam_is_fused_and_matches_the_default():
    """``fastflow.flows.adam`` picks torch's fused Adam for CPU float parameters: the same updates
    as the default implementation."""
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = copy.deepcopy(a)
    opt_a, opt_b = adam(a.parameters(), lr=1e-2, weight_decay=1e-3), torch.optim.Adam(b.parameters(), lr=1e-2,
                                                                                      weight_decay=1e-3)
    assert opt_a.defaults["fused"] is True
    x = torch.randn(32, 7)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert adam(a.parameters(), decoupled=True).__class__ is torch.optim.AdamW
