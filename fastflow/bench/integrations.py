"""``fastflow bench integrations``: the peers' own NSF models, plain vs accelerated by
``fastflow.integrations`` (vs the peer under ``torch.compile`` for the zuko coupling step).

Per peer (zuko, nflows, normflows) and structure (coupling, autoregressive), the issue's
configuration: 8 features, 5 transforms, hidden (64, 64), 8 bins, batch 512, float32, one
process. Two cases, each one call:

- ``train_step``: ``zero_grad``, the batch's negative log-likelihood and its backward (the
  gradients; no optimizer update);
- ``sample``: one call drawing 512 samples under ``no_grad``.

For zuko a diagnostic third column, ``floor: spline a no-op``: the accelerated model with the
spline replaced by the identity (zero log-det, gradients still reaching the conditioner), i.e.
what everything but the spline costs; no spline work can make the accelerated model faster.

Timing: each implementation is warmed up (``WARMUP`` calls), then ``rounds`` rounds (at least
``MIN_ROUNDS``; ``--repeats`` below that is raised) each time every implementation once, the order
rotating from round to round, so drift in the machine's speed hits all alike. Switching the
acceleration on and off happens between the timed calls, not inside them. Rows carry the median,
min, max, the per-round times, the ratio of medians and the median of the per-round ratios
(``paired_speedup``).

Every peer/structure also gets a ``loss_trajectory`` row: 50 Adam steps (lr 1e-3, a fixed batch
stream) from the same initialisation plain and accelerated in float32, and the peer's own in
float64; the largest relative deviations of the losses (the issue's <= 1e-4) accelerated vs plain
and each against float64 (which of the two float32 runs drifted).

Optional ``sbi`` case (skipped with a message when sbi is absent): an NPE training run
(``sbi.inference.NPE(density_estimator="nsf")``, sbi's nflows NSF) on a small simulator, a fixed
number of epochs, plain vs accelerated from the same seed, whole runs alternating; wall time and
whether the per-epoch training and validation losses match.
"""

from __future__ import annotations

import statistics
import time

import torch

from fastflow.bench import paired_ratio, source, time_interleaved

FEATURES, TRANSFORMS, HIDDEN, BINS, BATCH = 8, 5, 64, 8, 512
MIN_ROUNDS, WARMUP = 15, 3
TRAJECTORY_STEPS = 50
SBI_EPOCHS, SBI_SIMULATIONS, SBI_RUNS = 10, 2000, 5


def _zuko(kind):
    import zuko

    import fastflow.integrations.zuko as integ

    flow = zuko.flows.NSF(FEATURES, 0, transforms=TRANSFORMS, hidden_features=(HIDDEN, HIDDEN), bins=BINS,
                          passes=2 if kind == "coupling" else None)
    return flow, (lambda x: -flow().log_prob(x).mean()), (lambda n: flow().sample((n,))), integ


def _nflows(kind):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import autoregressive as ar
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.permutations import ReversePermutation

    import fastflow.integrations.nflows as integ

    layers = []
    for i in range(TRANSFORMS):
        if kind == "coupling":
            layers.append(PiecewiseRationalQuadraticCouplingTransform(
                torch.arange(FEATURES) % 2 == i % 2, lambda fi, fo: ResidualNet(fi, fo, HIDDEN, num_blocks=1),
                num_bins=BINS, tails="linear", tail_bound=5.0))
        else:
            layers.append(ar.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                FEATURES, HIDDEN, num_bins=BINS, tails="linear", tail_bound=5.0, num_blocks=1))
        layers.append(ReversePermutation(FEATURES))
    flow = Flow(CompositeTransform(layers), StandardNormal([FEATURES]))
    return flow, (lambda x: -flow.log_prob(x).mean()), (lambda n: flow.sample(n)), integ


def _normflows(kind):
    import normflows as nf

    import fastflow.integrations.normflows as integ

    layers = []
    for i in range(TRANSFORMS):
        if kind == "coupling":
            layers.append(nf.flows.CoupledRationalQuadraticSpline(FEATURES, 1, HIDDEN, num_bins=BINS,
                                                                  tail_bound=5.0, reverse_mask=bool(i % 2)))
        else:
            layers.append(nf.flows.AutoregressiveRationalQuadraticSpline(FEATURES, 1, HIDDEN, num_bins=BINS,
                                                                         tail_bound=5.0))
        layers.append(nf.flows.Permute(FEATURES, mode="swap"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(FEATURES, trainable=False), layers)
    return model, (lambda x: -model.log_prob(x).mean()), (lambda n: model.sample(n)[0]), integ


PEERS = {"zuko": _zuko, "nflows": _nflows, "normflows": _normflows}


class _Switch:
    """The acceleration of one peer turned on (``on()``) or off (``off()``) outside the timed calls."""

    def __init__(self, integ):
        self.integ, self.handle = integ, None

    def on(self):
        if self.handle is None:
            self.handle = self.integ.accelerate()

    def off(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def interleave(impls: dict, rounds: int, warmup: int = WARMUP) -> dict:
    """``impls``: name -> ``(setup, fn)``. Warm each ``fn`` up, then ``rounds`` rounds in which every
    implementation runs once (the order rotating), ``setup()`` untimed before its timed ``fn()``.
    Returns name -> stats with the per-round ``times``, or ``{"error": ...}`` for one that raised."""
    stats = time_interleaved({n: fn for n, (_, fn) in impls.items()}, "cpu", repeats=rounds, warmup=warmup,
                             setups={n: setup for n, (setup, _) in impls.items()})
    return {n: ({**{k: v for k, v in st.items() if k != "repeats"}, "rounds": st["repeats"]} if "repeats" in st
                else st) for n, st in stats.items()}


def _trajectory(make, switch, steps=TRAJECTORY_STEPS):
    """Loss trajectories over ``steps`` Adam steps from one initialisation and batch stream: plain
    and accelerated in float32, and the peer's own in float64 (the yardstick for both). Returns
    the largest relative deviations accelerated vs plain, plain vs float64, accelerated vs
    float64, and whether the accelerated losses are finite."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(steps, 128, FEATURES, generator=g)
    losses = []
    for on, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.float64)):
        switch.on() if on else switch.off()
        torch.manual_seed(0)
        model, nll, _, _ = make()
        model.to(dtype)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        run = []
        for i in range(steps):
            opt.zero_grad()
            loss = nll(data[i].to(dtype))
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(torch.tensor(run, dtype=torch.float64))
    switch.off()
    plain, fast, truth = losses

    def dev(a, b):
        return float(((a - b).abs() / b.abs()).max())

    return dev(fast, plain), dev(plain, truth), dev(fast, truth), bool(torch.isfinite(fast).all())


def _row(peer, kind, case, impl, version, **extra):
    return {"op": f"{peer} NSF {kind}", "mode": case, "n": BATCH, "impl": impl, "peer": peer, "version": version,
            "model": f"NSF {kind}", "case": case, "batch": BATCH, "features": FEATURES, "transforms": TRANSFORMS,
            "hidden": [HIDDEN, HIDDEN], "bins": BINS, "dtype": "float32", **extra}


def _timed_rows(peer, kind, case, stats, version, what):
    rows = []
    base = stats.get("plain", {})
    for impl, st in stats.items():
        row = _row(peer, kind, case, impl, version, timed=what, **st)
        if base.get("median_s") and st.get("median_s"):
            row["speedup_vs_plain"] = base["median_s"] / st["median_s"]
            row["paired_speedup"] = paired_ratio(base["times"], st["times"])
        rows.append(row)
    return rows


def _peer_rows(peer, kind, rounds, compile):
    try:
        torch.manual_seed(0)
        make = lambda: PEERS[peer](kind)  # noqa: E731
        model, nll, sample, integ = make()
    except ImportError as exc:
        return [_row(peer, kind, "-", "-", None, error=f"ImportError: {exc}")]
    version = integ.INTEGRATION.version()
    switch = _Switch(integ)
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        nll(x).backward()

    def draw():
        with torch.no_grad():
            return sample(BATCH)

    rows = []
    plain, fast = switch.off, switch.on
    floor = None
    if peer == "zuko":
        # a diagnostic, not an implementation: the accelerated model with the spline itself a
        # no-op (values through, zero log-det, gradients still reaching the conditioner), i.e.
        # what the rest of zuko costs; restored before every other implementation's call
        fused = integ._spline

        def noop(v, w, h, d, inverse, bound, slope):
            z = (w.sum(-1) + h.sum(-1) + d.sum(-1)) * 0
            return v + z, z

        def plain():
            integ._spline = fused
            switch.off()

        def fast():
            integ._spline = fused
            switch.on()

        def floor():
            integ._spline = noop
            switch.on()

    cases = {
        "train_step": ({"plain": (plain, step), "accelerated": (fast, step)},
                       "zero_grad + NLL of one batch + backward (no optimizer update)"),
        "sample": ({"plain": (plain, draw), "accelerated": (fast, draw)},
                   f"one call drawing {BATCH} samples under no_grad"),
    }
    if floor is not None:
        for impls, _ in cases.values():
            impls["floor: spline a no-op"] = (floor, impls["accelerated"][1])
    if compile and peer == "zuko" and kind == "coupling":
        compiled = torch.compile(nll)

        def compiled_step():
            model.zero_grad(set_to_none=True)
            compiled(x).backward()

        cases["train_step"][0]["torch.compile"] = (plain, compiled_step)
    try:
        for case, (impls, what) in cases.items():
            torch.manual_seed(0)
            rows += _timed_rows(peer, kind, case, interleave(impls, rounds), version, what)
        plain()  # the fused spline back in place (zuko: the floor's no-op may be the last set)
        dev, plain64, fast64, finite = _trajectory(make, switch)
        rows.append(_row(peer, kind, "loss_trajectory", "accelerated", version, steps=TRAJECTORY_STEPS,
                         max_rel_deviation=dev, finite=finite, within_1e_4=dev <= 1e-4,
                         plain_vs_float64=plain64, accelerated_vs_float64=fast64,
                         timed="none: 50 Adam steps (lr 1e-3, batch 128) plain and accelerated in float32 and "
                               "plain in float64, same seed and batches"))
    finally:
        if peer == "zuko":
            integ._spline = fused
        switch.off()
    return rows


class _NullTracker:
    """sbi's training tracker, logging nothing (sbi's default writes TensorBoard files)."""

    log_dir = None

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass


def _sbi_rows(quick):
    """An sbi NPE training run (nflows NSF), plain vs accelerated, whole runs alternating."""
    try:
        import sbi
        from sbi.inference import NPE
        from sbi.utils import BoxUniform
    except ImportError as exc:
        msg = f"sbi not installed ({exc}); pip install sbi to run this case"
        print(f"integrations: skipping the sbi case: {msg}")
        return [{"op": "sbi NPE nsf", "mode": "train_run", "n": SBI_SIMULATIONS, "impl": "-", "peer": "sbi",
                 "skipped": msg}]
    import fastflow.integrations.nflows as integ

    dim, epochs = 3, 2 if quick else SBI_EPOCHS
    sims = 500 if quick else SBI_SIMULATIONS
    g = torch.Generator().manual_seed(0)
    prior = BoxUniform(-2 * torch.ones(dim), 2 * torch.ones(dim))
    theta = torch.rand(sims, dim, generator=g) * 4 - 2
    xs = theta + 0.1 * torch.randn(sims, dim, generator=g) + 0.2 * theta.pow(2)  # a small nonlinear simulator
    switch = _Switch(integ)
    runs = {"plain": [], "accelerated": []}
    summaries = {}

    def train():
        torch.manual_seed(0)
        npe = NPE(prior=prior, density_estimator="nsf", tracker=_NullTracker(), show_progress_bars=False)
        npe.append_simulations(theta, xs)
        t0 = time.perf_counter()
        npe.train(max_num_epochs=epochs, stop_after_epochs=10**6, training_batch_size=200)
        dt = time.perf_counter() - t0
        return dt, {k: list(npe._summary[k]) for k in ("training_loss", "validation_loss")}

    try:
        for r in range(2 if quick else SBI_RUNS):
            for impl in (("plain", "accelerated") if r % 2 == 0 else ("accelerated", "plain")):
                switch.on() if impl == "accelerated" else switch.off()
                dt, summary = train()
                runs[impl].append(dt)
                summaries.setdefault(impl, summary)
    finally:
        switch.off()
    a = {k: torch.tensor(v, dtype=torch.float64) for k, v in summaries["plain"].items()}
    b = {k: torch.tensor(v, dtype=torch.float64) for k, v in summaries["accelerated"].items()}
    dev = max(float(((a[k] - b[k]).abs() / a[k].abs()).max()) for k in a)
    rows = []
    base = statistics.median(runs["plain"])
    for impl, ts in runs.items():
        med = statistics.median(ts)
        rows.append({"op": "sbi NPE nsf", "mode": "train_run", "n": sims, "impl": impl, "peer": "sbi",
                     "version": sbi.__version__, "case": "train_run", "epochs": epochs, "simulations": sims,
                     "theta_dim": dim, "training_batch_size": 200, "dtype": "float32",
                     "timed": f"npe.train(): {epochs} epochs (fixed), nflows NSF (sbi defaults: 5 transforms, "
                              "hidden 50, 10 bins)",
                     "median_s": med, "min_s": min(ts), "max_s": max(ts), "rounds": len(ts), "times": ts,
                     "speedup_vs_plain": base / med, "paired_speedup": paired_ratio(runs["plain"], ts),
                     "loss_max_rel_deviation": dev, "losses": summaries[impl]})
    return rows


def run(device="cpu", repeats=MIN_ROUNDS, quick=False, peers=None, compile=True, sbi=True, **_):
    if torch.device(device).type != "cpu":
        raise ValueError("fastflow bench integrations: CPU only (the peers' models, float32, one process)")
    rounds = 3 if quick else max(int(repeats), MIN_ROUNDS)
    rows = [{"op": "source", "mode": "-", "n": 0, "impl": "-", **source()}]
    for peer in peers or PEERS:
        for kind in ("coupling", "autoregressive"):
            rows += _peer_rows(peer, kind, rounds, compile and not quick)
    if sbi:
        try:
            rows += _sbi_rows(quick)
        except Exception as exc:  # sbi's API moves between versions: a result, not a lost run
            rows.append({"op": "sbi NPE nsf", "mode": "train_run", "n": SBI_SIMULATIONS, "impl": "-", "peer": "sbi",
                         "error": f"{type(exc).__name__}: {exc}"})
    return rows


TABLE_COLUMNS = ["op", "mode", "impl", "median_s", "min_s", "max_s", "speedup_vs_plain", "paired_speedup",
                 "max_rel_deviation", "plain_vs_float64", "accelerated_vs_float64", "loss_max_rel_deviation", "version"]
