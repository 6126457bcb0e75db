"""fastflow.integrations.glasflow on glasflow's own flows: CouplingNSF (linear tails and the
uniform-latent bounded spline), the rational-quadratic autoregressive flow, and RealNVP (no
spline: left exactly as it is); its vendored nflows and, in a subprocess, GLASFLOW_USE_NFLOWS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("glasflow")

import fastflow.integrations.glasflow as ffg  # noqa: E402
import fastflow.integrations.nflows as ffn  # noqa: E402
from glasflow import CouplingNSF, RealNVP  # noqa: E402
from glasflow.flows.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveFlow  # noqa: E402
from glasflow.nflows.transforms import autoregressive as gf_ar  # noqa: E402
from glasflow.nflows.transforms import splines as gf_splines  # noqa: E402
from glasflow.nflows.transforms.splines import rational_quadratic as gf_rq  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_backend_refused_at_once, check_equal, check_nested_backend, check_restore, check_training,
    check_untested_version, flow_data, perturb,
)

D, C, N = 4, 3, 48


def make_flow(kind: str, context: int = 0, seed: int = 0, scale: float = 0.3):
    torch.manual_seed(seed)
    kw = dict(n_conditional_inputs=context or None, n_neurons=16, n_blocks_per_transform=1)
    if kind == "coupling":
        flow = CouplingNSF(D, 2, num_bins=6, tail_bound=3.0, **kw)
    elif kind == "uniform":
        flow = CouplingNSF(D, 2, num_bins=6, distribution="uniform", **kw)
    elif kind == "autoregressive":
        flow = MaskedPiecewiseRationalQuadraticAutoregressiveFlow(D, 2, num_bins=6, tails="linear", tail_bound=3.0,
                                                                  **kw)
    else:
        flow = RealNVP(D, 2, **kw)
    return perturb(flow, scale) if scale else flow


def data(context: int, bounded: bool = False):
    return flow_data(N, D, context, bounded)


def log_prob(flow, x, c):
    return [flow.log_prob(x, conditional=c)]


def forward(flow, x, c):
    return list(flow.forward(x, conditional=c))


def inverse(flow, z, c):
    return list(flow.inverse(z, conditional=c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("context", [0, C])
@pytest.mark.parametrize("kind", ["coupling", "autoregressive", "realnvp"])
def test_flow_equal(kind, context, dtype):
    flow = make_flow(kind, context)
    x, c = data(context)
    for fn in (log_prob, forward, inverse):
        check_equal(fn, flow, [x, c], ffg.accelerate, dtype)


def test_uniform_latent_bounded_spline_equal():
    """distribution="uniform": tails=None, the bounded spline (K+1 slopes on [0, 1]) fused."""
    flow = make_flow("uniform", C, scale=0.1)
    x, c = data(C, bounded=True)
    first = flow._transform._transforms[0]
    assert first.tails is None
    for dtype in (torch.float64, torch.float32):
        check_equal(lambda f, x, c: list(f._transform._transforms[0](x, context=c)), flow, [x, c], ffg.accelerate,
                    dtype)
        y = first(x.to(dtype), context=c.to(dtype))[0].detach().clamp(0, 1)
        check_equal(lambda f, y, c: list(f._transform._transforms[0].inverse(y, context=c)), flow, [y, c],
                    ffg.accelerate, dtype)


def test_calls_reach_the_fused_op(monkeypatch):
    """Not vacuous: an accelerated CouplingNSF log-density runs fastflow's spline op."""
    from tests.integrations._common import record_backends

    seen = record_backends(monkeypatch)
    flow = make_flow("coupling").double()
    x, _ = data(0)
    with ffg.accelerate(backend=BACKEND):
        flow.log_prob(x)
    assert seen and set(seen) == {BACKEND}


def test_bounded_domain_error_kept():
    from glasflow.nflows.transforms.base import InputOutsideDomain

    x = torch.full((8,), 1.5)
    p = torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(8, 5)
    with ffg.accelerate(backend=BACKEND), pytest.raises(InputOutsideDomain):
        gf_splines.rational_quadratic_spline(x, *p)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_training_trajectory(kind):
    x, c = data(C)
    x, c = x.float(), c.float()

    def batch(flow, step):
        i = (step * 16) % N
        return -flow.log_prob(x[i:i + 16], conditional=c[i:i + 16]).mean()

    check_training(lambda: make_flow(kind, C, scale=0).float(), batch, ffg.accelerate)


def test_sampling_equal():
    flow = make_flow("coupling", C).float()
    _, c = data(C)
    c = c[:16].float()

    with torch.no_grad():
        torch.manual_seed(3)
        plain = flow.sample(16, conditional=c)
        with ffg.accelerate(backend=BACKEND):
            torch.manual_seed(3)
            fast = flow.sample(16, conditional=c)
    assert torch.isfinite(fast).all() and fast.shape == plain.shape
    assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max()


def _targets():
    return [(m, a) for m in (gf_rq, gf_splines, gf_ar)
            for a in ("unconstrained_rational_quadratic_spline", "rational_quadratic_spline") if hasattr(m, a)]


def test_restore_exactly():
    assert not ffg.uses_nflows()
    check_restore(ffg, _targets())


def test_vendored_fork_is_not_nflows():
    """The two integrations patch different modules: each restores only its own."""
    import nflows.transforms.splines.rational_quadratic as nf_rq

    before = nf_rq.unconstrained_rational_quadratic_spline
    with ffg.accelerate(backend=BACKEND):
        assert nf_rq.unconstrained_rational_quadratic_spline is before and not ffn.is_accelerated()
        with ffn.accelerate(backend=BACKEND):
            assert nf_rq.unconstrained_rational_quadratic_spline is not before
        assert nf_rq.unconstrained_rational_quadratic_spline is before and ffg.is_accelerated()


def test_untested_version_patches_nothing(monkeypatch):
    check_untested_version(ffg, _targets(), monkeypatch)


def test_nested_backend_belongs_to_the_handle(monkeypatch):
    flow = make_flow("coupling").double()
    x, _ = data(0)
    check_nested_backend(ffg, lambda: flow.log_prob(x), monkeypatch)


def test_backend_refused_at_accelerate_time():
    check_backend_refused_at_once(ffg)


_USE_NFLOWS = textwrap.dedent("""
    import torch, nflows.transforms.splines.rational_quadratic as nf_rq
    import fastflow.integrations.glasflow as ffg, fastflow.integrations.nflows as ffn
    from tests.integrations.test_glasflow import make_flow, data, log_prob, forward, inverse
    from tests.integrations._common import check_equal, check_training
    import glasflow
    assert glasflow.USE_NFLOWS and ffg.uses_nflows()
    before = nf_rq.unconstrained_rational_quadratic_spline
    x, c = data(3)
    for kind in ("coupling", "autoregressive"):
        flow = make_flow(kind, 3)
        for fn in (log_prob, forward, inverse):
            check_equal(fn, flow, [x, c], ffg.accelerate, torch.float64)
    check_training(lambda: make_flow("coupling", 3, scale=0).float(),
                   lambda f, s: -f.log_prob(x[:16].float(), conditional=c[:16].float()).mean(), ffg.accelerate,
                   steps=10)
    h = ffg.accelerate()
    assert ffn.is_accelerated() and nf_rq.unconstrained_rational_quadratic_spline is not before
    assert ffg.INTEGRATION._saved == []  # nothing of its own: nflows' patch, held through the delegate
    h2 = ffn.accelerate()
    ffg.restore()
    assert not h.active and ffn.is_accelerated()  # the user's own nflows handle stays open
    h2.close()
    assert not ffn.is_accelerated() and nf_rq.unconstrained_rational_quadratic_spline is before
    print("ok")
""")


def test_use_nflows_mode_delegates_to_the_nflows_integration():
    """GLASFLOW_USE_NFLOWS=true (read when glasflow is imported: a fresh process): glasflow.nflows
    is nflows itself; accelerate() holds the nflows integration's patch, equal and restorable."""
    pytest.importorskip("nflows")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "GLASFLOW_USE_NFLOWS": "true", "PYTHONPATH": root, "OMP_NUM_THREADS": "1",
           "FASTFLOW_TEST_BACKEND": BACKEND}
    out = subprocess.run([sys.executable, "-c", _USE_NFLOWS], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
