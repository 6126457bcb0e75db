"""Helpers of the integration tests: run a peer's model with and without acceleration and
compare outputs, log-dets and gradients (float64 tightly; float32 against a float64 evaluation)."""

from __future__ import annotations

import copy
import os

import torch

BACKEND = os.environ.get("FASTFLOW_TEST_BACKEND", "numba")
F64_RTOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the whole tensor's scale: entries near 0 are not singled out)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move the parameters away from the peers' identity initialisations (non-trivial splines)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return model


def flow_data(n: int, d: int, context: int, bounded: bool = False):
    """``n`` float64 points of ``d`` features (in [0, 1) when ``bounded``, else N(0, 1.5^2)) and
    ``context`` context features (None if 0), from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) if bounded else \
        torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    c = torch.randn(n, context, generator=g, dtype=torch.float64) if context else None
    return x, c


def evaluate(fn, model, inputs, seed: int = 0):
    """``fn(model, *inputs)`` -> tensors; returns them and the gradients of a fixed random
    combination of them with respect to the model's parameters and the float inputs."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    outs = fn(model, *inputs)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    wrt = [p for p in model.parameters() if p.requires_grad] + [t for t in inputs if isinstance(t, torch.Tensor)
                                                                and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
    return [o.detach() for o in outs], list(grads)


def check_equal(fn, model, inputs, accelerate, dtype, seed: int = 0):
    """Accelerated == the peer's own: float64 to 1e-10 relative; in float32 the accelerated
    error against the peer's float64 evaluation is at most the peer's own float32 error."""
    model = model.to(dtype)
    inputs = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    torch.manual_seed(seed)
    plain = evaluate(fn, model, inputs, seed)
    with accelerate(backend=BACKEND) as handle:
        assert handle.active
        torch.manual_seed(seed)
        fast = evaluate(fn, model, inputs, seed)
    pairs = list(zip(plain[0] + plain[1], fast[0] + fast[1]))
    assert len(pairs) > 2
    for i, (p, f) in enumerate(pairs):
        assert f.shape == p.shape and f.dtype == p.dtype, (i, f.shape, p.shape)
        assert torch.isfinite(f).all(), i
    if dtype == torch.float64:
        worst = max(rel(f, p) for p, f in pairs)
        assert worst <= F64_RTOL, worst
        return
    model64 = copy.deepcopy(model).double()
    inputs64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    torch.manual_seed(seed)
    truth = evaluate(fn, model64, inputs64, seed)
    for i, (t, (p, f)) in enumerate(zip(truth[0] + truth[1], pairs)):
        err_peer = (p.double() - t).pow(2).mean().sqrt().item()
        err_fast = (f.double() - t).pow(2).mean().sqrt().item()
        # Through a whole model most of the float32 error is the conditioners' and the sums'
        # (the same operations on and off), and a value that rounding moves across a knot
        # changes the bin (the log-det's x-derivative jumps there), so which of two runs lands
        # closer is a coin flip: here the accelerated model is held to the peer's own error
        # class (root-mean-square, factor 2); the spline itself, the only thing that differs,
        # is held to "no worse" (max and RMS) by check_spline_f32.
        # Parameter gradients sum over the batch, so one sample whose value rounding moved
        # across a knot dominates them (measured: one sample of 64 carrying 5x the peer's own
        # error there, on the peer's side as much as on ours): a factor 10 for them, still far
        # below what any wrong derivative gives (an O(1) relative error).
        # and 256 float32 roundings of the tensor's largest entry (1.5e-5 relative) as a floor:
        # measured, a normflows gradient entry of 745 off by 0.0088 accelerated, 0.0013 plain.
        factor, roundings = (2.0, 1) if i < len(truth[0]) else (10.0, 256)
        slack = roundings * 2.0**-24 * t.abs().max().item()
        assert err_fast <= factor * err_peer + slack, (i, err_fast, err_peer)


def check_spline_f32(peer_fn, fast_fn, inputs32):
    """The spline alone in float32 (the peer's own function or class vs accelerated), each
    against the peer's float64 evaluation of the same float32 values: the accelerated error
    (max and root-mean-square, outputs, log-dets and gradients) is no larger than the peer's."""
    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        outs = fn(*ts)
        g = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, ts))

    truth = run(peer_fn, [t.double() for t in inputs32])
    peer = run(peer_fn, inputs32)
    fast = run(fast_fn, inputs32)
    for i, (t, p, f) in enumerate(zip(truth, peer, fast)):
        assert torch.isfinite(f).all(), i
        ok = torch.isfinite(p)  # the peer's own NaN (if any) is not a yardstick
        ep, ef = (p.double() - t)[ok], (f.double() - t)[ok]
        # where both are at float32's own resolution (the result's final rounding), "no worse"
        # is up to that rounding: 2^-24 of the value's scale
        tt = t[ok]
        emax, pmax = ef.abs().max().item(), ep.abs().max().item()
        erms, prms = ef.pow(2).mean().sqrt().item(), ep.pow(2).mean().sqrt().item()
        assert emax <= pmax + 2.0**-24 * tt.abs().max().item(), (i, emax, pmax)
        assert erms <= prms + 2.0**-24 * tt.pow(2).mean().sqrt().item(), (i, erms, prms)


def train_losses(model, batch_fn, steps: int = 50, lr: float = 1e-3):
    """Adam on ``batch_fn(model, step)`` (a scalar loss): the loss of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss = batch_fn(model, step)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out, dtype=torch.float64)


def check_training(make_model, batch_fn, accelerate, steps: int = 50):
    """The same loss trajectory on and off (relative deviation <= 1e-4 over ``steps`` steps)."""
    torch.manual_seed(0)
    a = train_losses(make_model(), batch_fn, steps)
    with accelerate(backend=BACKEND):
        torch.manual_seed(0)
        b = train_losses(make_model(), batch_fn, steps)
    dev = ((a - b).abs() / a.abs()).max().item()
    assert torch.isfinite(b).all()
    assert dev <= 1e-4, dev
    return dev


def check_restore(module_mod, targets, patched=None):
    """accelerate() patches every target (the first ``patched`` of them; the others must stay
    untouched), is idempotent and reference-counted, and off restores the very same objects."""
    before = [(o, n, o.__dict__.get(n, "<missing>")) for o, n in targets]
    h1 = module_mod.accelerate(backend=BACKEND)
    h2 = module_mod.accelerate(backend=BACKEND)  # idempotent: one patch, two shares
    assert module_mod.is_accelerated()
    k = len(targets) if patched is None else patched
    patched = [o.__dict__.get(n, "<missing>") for o, n in targets]
    assert all(p is not b for p, (_, _, b) in zip(patched[:k], before[:k]))
    assert all(p is b for p, (_, _, b) in zip(patched[k:], before[k:]))
    h1.close()
    h1.close()  # a handle releases its share once
    assert module_mod.is_accelerated()
    assert all(o.__dict__.get(n, "<missing>") is p for (o, n), p in zip(targets, patched))
    h2.close()
    assert not module_mod.is_accelerated()
    assert all(o.__dict__.get(n, "<missing>") is b for o, n, b in before)
    with module_mod.accelerate():
        pass
    assert all(o.__dict__.get(n, "<missing>") is b for o, n, b in before)
    module_mod.accelerate()
    module_mod.accelerate()
    module_mod.restore()  # the global switch off, whatever handles are open
    assert not module_mod.is_accelerated()
    assert all(o.__dict__.get(n, "<missing>") is b for o, n, b in before)


def check_untested_version(module_mod, targets, monkeypatch):
    import pytest

    from fastflow.integrations._patch import UntestedVersionWarning

    before = [o.__dict__.get(n, "<missing>") for o, n in targets]
    monkeypatch.setattr(module_mod.INTEGRATION, "version", lambda: "99.0")
    with pytest.warns(UntestedVersionWarning, match="99.0"):
        h = module_mod.accelerate()
    assert not h.active and not module_mod.is_accelerated()
    assert all(o.__dict__.get(n, "<missing>") is b for (o, n), b in zip(targets, before))


def record_backends(monkeypatch) -> list:
    """The ``backend`` argument of every backend resolution of the spline and polynomial ops from
    now on."""
    import importlib

    seen = []
    # the modules (fastflow.ops.rq_spline is the function)
    for module in map(importlib.import_module, ("fastflow.ops.rq_spline", "fastflow.ops.polynomial")):
        real = module.resolve_backend

        def spy(op, tensor, backend=None, real=real, **kwargs):
            seen.append(backend)
            return real(op, tensor, backend, **kwargs)

        monkeypatch.setattr(module, "resolve_backend", spy)
    return seen


def check_nested_backend(module_mod, run, monkeypatch):
    """A handle's backend is in force while it is the innermost handle open and again once an
    inner one closes (in or out of order); nothing is left behind when the last one closes."""
    seen = record_backends(monkeypatch)

    def backends(fn=run):
        seen.clear()
        fn()
        return set(seen)

    outer_backend = BACKEND if BACKEND != "reference" else None
    with module_mod.accelerate(backend=outer_backend) as outer:
        assert backends() == {outer_backend}
        with module_mod.accelerate(backend="reference") as inner:
            assert backends() == {"reference"}
        assert backends() == {outer_backend}  # the outer scope's own backend again
        assert outer.active and not inner.active
        assert outer.backend == outer_backend and inner.backend == "reference"
        with module_mod.accelerate():
            assert backends() == {None}
        assert backends() == {outer_backend}
    assert not module_mod.is_accelerated() and backends() == set()  # the peer's own code
    a = module_mod.accelerate(backend="reference")
    b = module_mod.accelerate(backend=outer_backend)
    a.close()  # out of order: b is still the innermost open handle
    assert backends() == {outer_backend}
    c = module_mod.accelerate(backend="reference")
    b.close()
    assert backends() == {"reference"}
    module_mod.restore()
    assert not c.active and not module_mod.is_accelerated() and backends() == set()
    c.close()  # after restore(): nothing left to release


def check_backend_refused_at_once(module_mod):
    """accelerate(backend=...) raises at once, and changes nothing, for a name that is no
    backend, a non-string, a backend without spline kernels and one that cannot run here."""
    import re

    import pytest

    from fastflow.backends import BACKENDS, BackendUnavailableError, UnknownBackendError

    with module_mod.accelerate(backend=BACKEND) as outer:
        with pytest.raises(UnknownBackendError, match="'nope'"):
            module_mod.accelerate(backend="nope")
        with pytest.raises(TypeError, match="backend"):
            module_mod.accelerate(backend=5)
        with pytest.raises(BackendUnavailableError, match="no kernel for 'rq_spline'"):
            module_mod.accelerate(backend="torch")
        for name in ("cuda", "triton"):
            reason = BACKENDS[name].probe()
            if reason is not None:  # e.g. no CUDA device here
                with pytest.raises(BackendUnavailableError, match=re.escape(reason)):
                    module_mod.accelerate(backend=name)
        assert outer.active and module_mod.INTEGRATION.backend == BACKEND
        assert len(module_mod.INTEGRATION._handles) == 1
    assert not module_mod.is_accelerated()
    with pytest.raises(UnknownBackendError):
        module_mod.accelerate(backend="nope")
    assert not module_mod.is_accelerated()
