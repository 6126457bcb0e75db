"""fastflow.integrations.sbi on every sbi density estimator: float64 losses and gradients equal
to sbi's own, the same training trajectory, the fused op reached exactly where ``ESTIMATORS``
says (and sbi's own code, bit for bit, everywhere else), one handle for nflows and zuko."""

from __future__ import annotations

import pathlib

import pytest
import torch

pytest.importorskip("sbi")

import fastflow.integrations.nflows as ffn  # noqa: E402
import fastflow.integrations.sbi as ffs  # noqa: E402
import fastflow.integrations.zuko as ffz  # noqa: E402
from sbi.neural_nets import posterior_nn  # noqa: E402
from tests.integrations._common import (  # noqa: E402
    BACKEND, check_backend_refused_at_once, check_equal, check_nested_backend, check_restore, check_training,
    check_untested_version, evaluate, perturb, record_backends,
)

THETA, X, N = 3, 2, 48
FUSED = [name for name, e in ffs.ESTIMATORS.items() if e.op is not None]
UNCHANGED = [name for name, e in ffs.ESTIMATORS.items() if e.op is None]


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    theta = torch.rand(N, THETA, generator=g, dtype=torch.float64) * 4 - 2
    x = theta[:, :X] + 0.3 * theta[:, 1:].pow(2) + 0.1 * torch.randn(N, X, generator=g, dtype=torch.float64)
    return theta.to(dtype), x.to(dtype)


def build(name, dtype=torch.float64, scale=0.2):
    """sbi's estimator ``name``, small, built (and z-scored) in ``dtype``; perturbed off its
    identity initialisation unless ``scale`` is 0."""
    theta, x = data(dtype)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # nflows' MADE builds its masks in the default dtype
    try:
        est = posterior_nn(model=name, hidden_features=16, num_transforms=2, num_bins=6, num_components=2)(theta, x)
    finally:
        torch.set_default_dtype(old)
    est = est.to(dtype)
    return perturb(est, scale) if scale else est


def loss(est, theta, x):
    return [est.loss(theta, x)]


@pytest.mark.parametrize("name", list(ffs.ESTIMATORS))
def test_float64_losses_and_gradients_equal(name):
    theta, x = data()
    check_equal(loss, build(name), [theta, x], ffs.accelerate, torch.float64)


@pytest.mark.parametrize("name", list(ffs.ESTIMATORS))
def test_fused_op_exactly_where_the_table_says(name, monkeypatch):
    """ESTIMATORS is true: an estimator with a fused op reaches it (losses, gradients and
    sampling); one without never does and is sbi's own code bit for bit."""
    est = build(name)
    theta, x = data()
    seen = record_backends(monkeypatch)
    plain = evaluate(loss, est, [theta, x])
    assert not seen
    with ffs.accelerate(backend=BACKEND):
        fast = evaluate(loss, est, [theta, x])
        with torch.no_grad():
            est.float().sample((3,), x[:2].float())
        est.double()
    if ffs.ESTIMATORS[name].op is None:
        assert not seen
        assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], fast[0] + fast[1]))
    else:
        assert seen and set(seen) == {BACKEND}


@pytest.mark.parametrize("name", FUSED)
def test_training_trajectory(name):
    theta, x = data(torch.float32)

    def batch(est, step):
        i = (step * 16) % N
        return est.loss(theta[i:i + 16], x[i:i + 16]).mean()

    check_training(lambda: build(name, torch.float32, scale=0), batch, ffs.accelerate)


@pytest.mark.parametrize("name", FUSED)
def test_sampling_equal(name):
    est = build(name, torch.float32)
    _, x = data(torch.float32)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = est.sample((8,), x[:4])
        with ffs.accelerate(backend=BACKEND):
            torch.manual_seed(3)
            fast = est.sample((8,), x[:4])
    assert torch.isfinite(fast).all() and fast.shape == plain.shape
    assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max()


def test_npe_run_equal():
    """A whole (short) sbi NPE training run: the same per-epoch losses accelerated."""
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    from fastflow.bench.integrations import NullTracker

    theta, x = data(torch.float32)
    prior = BoxUniform(-2 * torch.ones(THETA), 2 * torch.ones(THETA))

    def run():
        torch.manual_seed(0)
        npe = NPE(prior=prior, density_estimator=posterior_nn(model="zuko_nsf", hidden_features=16, num_transforms=2),
                  tracker=NullTracker(), show_progress_bars=False)
        npe.append_simulations(theta, x)
        npe.train(max_num_epochs=3, stop_after_epochs=10**6, training_batch_size=16)
        return torch.tensor(npe._summary["training_loss"] + npe._summary["validation_loss"], dtype=torch.float64)

    a = run()
    with ffs.accelerate(backend=BACKEND):
        b = run()
    assert a.shape == b.shape and len(a) >= 6 and torch.isfinite(b).all()
    assert ((a - b).abs() / a.abs()).max() <= 1e-4


def test_every_sbi_flow_estimator_is_in_the_table():
    from sbi.neural_nets.factory import model_builders

    assert set(model_builders) - {"mnle", "mnpe", "tabpfn"} == set(ffs.ESTIMATORS)


def test_docs_table_is_the_estimators_table():
    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "content" / "integrations.md"
    assert ffs.law_table() in page.read_text()


def _targets():
    from nflows.transforms.splines import rational_quadratic as nf_rq
    from zuko.transforms import MonotonicRQSTransform

    return [(nf_rq, "unconstrained_rational_quadratic_spline"), (nf_rq, "rational_quadratic_spline"),
            (MonotonicRQSTransform, "_call"), (MonotonicRQSTransform, "call_and_ladj")]


def test_restore_exactly():
    check_restore(ffs, _targets())


def test_one_handle_holds_both_and_leaves_the_users_own():
    with ffz.accelerate(backend=BACKEND) as mine:
        h = ffs.accelerate(backend=BACKEND)
        assert ffn.is_accelerated() and ffz.is_accelerated() and ffs.is_accelerated()
        h.close()
        assert not ffn.is_accelerated() and ffz.is_accelerated() and mine.active
        ffs.accelerate()
        ffs.restore()
        assert not ffs.is_accelerated() and not ffn.is_accelerated() and ffz.is_accelerated()
    assert not ffz.is_accelerated()


def test_untested_version_patches_nothing(monkeypatch):
    check_untested_version(ffs, _targets(), monkeypatch)
    assert not ffn.is_accelerated() and not ffz.is_accelerated()


def test_nested_backend_belongs_to_the_handle(monkeypatch):
    nsf, zuko_nsf = build("nsf"), build("zuko_nsf")
    theta, x = data()

    def run():
        nsf.loss(theta, x)
        zuko_nsf.loss(theta, x)

    check_nested_backend(ffs, run, monkeypatch)


def test_backend_refused_at_accelerate_time():
    check_backend_refused_at_once(ffs)
    assert not ffn.is_accelerated() and not ffz.is_accelerated()
