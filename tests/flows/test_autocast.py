"""Every registered model under ``torch.autocast("cpu", torch.bfloat16)`` (issue 28).

The oracle is the same model in float32. Under autocast the conditioners' linear and conv layers
compute in bfloat16 while fastflow's ops compute in float32 (``fastflow/ops/_autocast.py``), so
the two differ by the conditioners' rounding only. The bound, per sample, in nats:

    |log p_bf16(x) - log p_f32(x)| <= 16 u (D + |log p_f32(x)|),   u = 2^-8 (bfloat16's unit round-off)

Why: a bfloat16 linear layer rounds its input, its weight and its output (accumulating in
float32), a relative error of about 3u per layer; the configurations here have at most two such
layers per conditioner, and at most four conditioned layers act on each dimension, so each
conditioner output carries a relative error below ~16u (a linear, not a random-walk, sum of the
worst cases). Each dimension's log-det term and each base-density term ``z^2 / 2`` moves by that
relative amount of its size: hence ``16u`` per nat of ``|log p|`` plus ``16u`` per dimension for
terms that cancel inside ``log p``. Samples obey the same relative bound elementwise, ``16u (1 + |x|)``.

Training (50 Adam steps, lr 1e-3, the same data and seeds): the bound above at every step, plus a
drift term, a tenth of the distance the float32 run's loss has travelled: Adam normalises each
step, so bfloat16 gradient noise of relative size ~u changes the direction of a step by O(u) and the
two parameter trajectories separate by a small fraction of the path length (measured: under 1%;
10% leaves room for the loss landscape's curvature). The autocast run must also make at least half
the float32 run's progress, so a training run whose gradients were cut by a cast would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.flows.training import adam, ml_loss
from tests.flows._autocast_models import UNCONDITIONAL_ONLY, data, registered, shape_of, small_flow

U = 2.0 ** -8  # bfloat16 unit round-off (8 significand bits)
CONTEXT = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _cases():
    return [pytest.param(name, ctx, id=f"{name}-{'ctx' if ctx else 'noctx'}")
            for name in registered() for ctx in (None, CONTEXT) if not (ctx and name in UNCONDITIONAL_ONLY)]


def _context(n, ctx, seed=2):
    return None if ctx is None else torch.randn(n, ctx, generator=torch.Generator().manual_seed(seed))


def _dims(name):
    return math.prod(shape_of(name))


def _trained(name, ctx):
    """A model a few float32 steps away from its initialisation: many layers start as the identity
    (zero-initialised last layers), where a bfloat16 conditioner would change nothing."""
    flow = small_flow(name, ctx)
    x, c = data(name, 64), _context(64, ctx)
    opt = adam(flow.parameters(), lr=1e-2)
    torch.manual_seed(4)
    for _ in range(10):
        loss = ml_loss(flow, x, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval(), x, c


def _assert_within(got, ref, tol, what):
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}, expected float32"
    assert torch.isfinite(got).all(), f"{what}: non-finite values under autocast"
    err = (got - ref).abs()
    assert (err <= tol).all(), f"{what}: max error {float(err.max()):.3g} beyond the bfloat16 bound (worst " \
                               f"ratio {float((err / tol).max()):.2f})"


@pytest.mark.parametrize("name,ctx", _cases())
def test_log_prob_and_sampling_under_autocast(name, ctx):
    flow, x, c = _trained(name, ctx)
    d = _dims(name)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = flow.log_prob(x, c)
        torch.manual_seed(0)
        with torch.autocast("cpu", torch.bfloat16):
            got = flow.log_prob(x, c)
        _assert_within(got, ref, 16 * U * (d + ref.abs()), f"{name} log_prob")

        # sampling: the same base noise through the inverse; with a batch of contexts (B, F)
        # the samples are (B, n, *shape)
        n, cs = 5, _context(4, ctx, seed=7)
        torch.manual_seed(1)
        ref_x, ref_lp = flow.sample_and_log_prob(n, cs)
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16):
            got_x, got_lp = flow.sample_and_log_prob(n, cs)
        assert got_x.shape == ref_x.shape and got_lp.shape == ref_lp.shape
        _assert_within(got_x, ref_x, 16 * U * (1 + ref_x.abs()), f"{name} sample_and_log_prob samples")
        _assert_within(got_lp, ref_lp, 16 * U * (d + ref_lp.abs()), f"{name} sample_and_log_prob log_prob")
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16):
            got_s = flow.sample(n, cs)
        _assert_within(got_s, ref_x, 16 * U * (1 + ref_x.abs()), f"{name} sample")


def _train(name, ctx, autocast, steps=50, lr=1e-3):
    flow = small_flow(name, ctx)
    x, c = data(name, 64), _context(64, ctx)
    opt = adam(flow.parameters(), lr=lr)
    torch.manual_seed(5)  # the stochastic log-det estimators draw the same probes in both runs
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = ml_loss(flow, x, c)
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        for p in flow.parameters():
            assert p.grad is None or p.grad.dtype == p.dtype
        opt.step()
        losses.append(float(loss.detach()))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("name,ctx", _cases())
def test_training_under_autocast_tracks_float32(name, ctx):
    ref = _train(name, ctx, autocast=False)
    got = _train(name, ctx, autocast=True)
    assert torch.isfinite(got).all(), f"{name}: non-finite loss under autocast: {got.tolist()}"
    d = _dims(name)
    travelled = (ref[0] - ref).clamp_min(0)
    tol = 16 * U * (d + ref.abs()) + 0.1 * travelled
    err = (got - ref).abs()
    assert (err <= tol).all(), (f"{name}: autocast loss off the float32 run by {float(err.max()):.3g} nats at step "
                                f"{int(err.argmax())} (bound {float(tol[err.argmax()]):.3g})")
    progress, ref_progress = float(got[0] - got[-1]), float(ref[0] - ref[-1])
    assert ref_progress > 0, f"{name}: the float32 run did not train ({ref.tolist()[:3]}...)"
    assert progress >= 0.5 * ref_progress, f"{name}: autocast run progressed {progress:.3g} nats, float32 " \
                                           f"{ref_progress:.3g}"
