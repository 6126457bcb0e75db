"""``fastflow bench integrations``: the peers' own models, plain vs accelerated by
``fastflow.integrations`` (vs the peer under ``torch.compile`` for the zuko coupling step).

Per peer (zuko, nflows, normflows, glasflow) and structure (coupling, autoregressive; glasflow's
own ``CouplingNSF``, rational-quadratic autoregressive flow and ``RealNVP``), the issue's
configuration: 8 features, 5 transforms, hidden (64, 64), 8 bins, batch 512, float32, one
process. Two cases, each one call:

- ``train_step``: ``zero_grad``, the batch's negative log-likelihood and its backward (the
  gradients; no optimizer update);
- ``sample``: one call drawing 512 samples under ``no_grad``.

Every model with a fused law gets a diagnostic third column, ``floor: spline a no-op``: the
accelerated model with the fused spline replaced by the identity (zero log-det, gradients still
reaching the conditioner), i.e. what everything but the spline costs; no spline work can make
the accelerated model faster. A model without one (``RealNVP``, sbi's ``maf``...) is the peer's
own code either way: its rows show that (about 1x) and have no floor.

Timing: each implementation is warmed up (``WARMUP`` calls), then ``rounds`` rounds (at least
``MIN_ROUNDS``; ``--repeats`` below that is raised) each time every implementation once, the order
rotating from round to round, so drift in the machine's speed hits all alike. Switching the
acceleration on and off happens between the timed calls, not inside them. Rows carry the median,
min, max, the per-round times, the ratio of medians and the median of the per-round ratios
(``paired_speedup``).

Every accelerated model also gets a ``loss_trajectory`` row: 50 Adam steps (lr 1e-3, a fixed
batch stream) from the same initialisation plain and accelerated in float32, and the peer's own in
float64; the largest relative deviations of the losses (the issue's <= 1e-4) accelerated vs plain
and each against float64 (which of the two float32 runs drifted).

sbi (skipped with a message when sbi is absent): every density estimator of
``fastflow.integrations.sbi.ESTIMATORS`` at sbi's defaults (5 transforms, hidden 50, 10 bins for
the nflows splines, z-scoring) on 3 parameters and 5 data dimensions, accelerated by
``fastflow.integrations.sbi``: ``train_step`` on a batch of 200 (sbi's training batch size),
``sample`` (512 draws for one observation), the loss trajectory, and for the spline estimators
and sbi's default ``maf`` a whole NPE training run (``NPE(...).train()``, a fixed number of
epochs on a small nonlinear simulator, whole runs alternating; wall time and whether the
per-epoch training and validation losses match).
"""

from __future__ import annotations


import torch

from fastflow.bench import paired_ratio, source, time_interleaved

FEATURES, TRANSFORMS, HIDDEN, BINS, BATCH = 8, 5, 64, 8, 512
MIN_ROUNDS, WARMUP = 15, 3
TRAJECTORY_STEPS = 50
SBI_EPOCHS, SBI_SIMULATIONS, SBI_RUNS = 10, 2000, 3
SBI_THETA, SBI_X, SBI_BATCH = 3, 5, 200
UNCHANGED_ROUNDS = 5  # models accelerate() leaves as they are: a sanity row, not a measurement


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


def _glasflow(kind):
    from glasflow import CouplingNSF, RealNVP
    from glasflow.flows.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveFlow

    import fastflow.integrations.glasflow as integ

    if kind == "coupling":
        flow = CouplingNSF(FEATURES, TRANSFORMS, n_neurons=HIDDEN, num_bins=BINS, tail_bound=5.0)
    elif kind == "autoregressive":
        flow = MaskedPiecewiseRationalQuadraticAutoregressiveFlow(FEATURES, TRANSFORMS, n_neurons=HIDDEN,
                                                                  num_bins=BINS, tails="linear", tail_bound=5.0)
    else:
        flow = RealNVP(FEATURES, TRANSFORMS, n_neurons=HIDDEN)
    return flow, (lambda x: -flow.log_prob(x).mean()), (lambda n: flow.sample(n)), integ


PEERS = {"zuko": _zuko, "nflows": _nflows, "normflows": _normflows, "glasflow": _glasflow}
# the structures timed per peer, and the model named in the rows
KINDS = {"glasflow": {"coupling": "CouplingNSF", "autoregressive": "MaskedPiecewiseRationalQuadraticAutoregressiveFlow",
                      "realnvp": "RealNVP"}}
FUSED = {("glasflow", "realnvp"): False}  # models with no fused law (default: they have one)


def _sbi(name):
    """sbi's estimator ``name`` at sbi's defaults; the loss and sampler take an (n, 8) batch:
    3 parameters and the 5 data dimensions they are conditioned on."""
    from sbi.neural_nets import posterior_nn

    import fastflow.integrations.sbi as integ

    g = torch.Generator().manual_seed(2)
    theta, x = _simulate(256, g)
    est = posterior_nn(model=name)(theta, x)
    obs = x[:1]
    return (est, (lambda b: est.loss(b[:, :SBI_THETA], b[:, SBI_THETA:]).mean()),
            (lambda n: est.sample((n,), obs)), integ)


def _simulate(n, g):
    """A small nonlinear simulator: theta ~ U(-2, 2)^3, x (5 values) its features plus noise."""
    theta = torch.rand(n, SBI_THETA, generator=g) * 4 - 2
    feats = torch.cat([theta, theta[:, :1] * theta[:, 1:2], theta[:, 2:].pow(2)], 1)
    return theta, feats + 0.1 * torch.randn(n, SBI_X, generator=g)


class _Floor:
    """The fused spline a no-op wherever the integrations call it (values through, zero log-det,
    gradients still reaching the conditioner): ``on()``/``off()`` outside the timed calls."""

    def __init__(self):
        import importlib

        self.zuko = importlib.import_module("fastflow.integrations.zuko")
        self.ops = importlib.import_module("fastflow.ops.rq_spline")  # the module, not the function
        self.pkg = importlib.import_module("fastflow.ops")  # where zuko's polynomial laws find their ops
        self.fused = (self.zuko._spline, self.ops.rq_spline, self.ops.rq_spline_bounded, self.pkg.bernstein,
                      self.pkg.sos_polynomial)

    @staticmethod
    def _noop(v, w, h, d, *args, **kwargs):
        z = (w.sum(-1) + h.sum(-1) + d.sum(-1)) * 0
        return v + z, z

    @staticmethod
    def _noop_law(v, p, *args, **kwargs):  # the polynomial laws: one parameter tensor
        z = p.flatten(v.dim()).sum(-1) * 0
        return v + z, z

    def on(self):
        self.zuko._spline = self.ops.rq_spline = self.ops.rq_spline_bounded = self._noop
        self.pkg.bernstein = self.pkg.sos_polynomial = self._noop_law

    def off(self):
        (self.zuko._spline, self.ops.rq_spline, self.ops.rq_spline_bounded, self.pkg.bernstein,
         self.pkg.sos_polynomial) = self.fused


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


def _trajectory(make, switch, width=FEATURES, steps=TRAJECTORY_STEPS):
    """Loss trajectories over ``steps`` Adam steps from one initialisation and batch stream: plain
    and accelerated in float32, and the peer's own in float64 (the yardstick for both). Returns
    the largest relative deviations accelerated vs plain, plain vs float64, accelerated vs
    float64, and whether the accelerated losses are finite."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(steps, 128, width, generator=g)
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
    if peer == "sbi":
        return {"op": f"sbi {kind}", "mode": case, "n": SBI_BATCH, "impl": impl, "peer": "sbi", "version": version,
                "model": kind, "case": case, "batch": SBI_BATCH, "theta_dim": SBI_THETA, "x_dim": SBI_X,
                "dtype": "float32", "config": "sbi defaults (posterior_nn(model=...))", **extra}
    model = KINDS.get(peer, {}).get(kind, f"NSF {kind}")
    return {"op": f"{peer} {model}", "mode": case, "n": BATCH, "impl": impl, "peer": peer, "version": version,
            "model": model, "case": case, "batch": BATCH, "features": FEATURES, "transforms": TRANSFORMS,
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


def _peer_rows(peer, kind, rounds, compile, make=None, fused=True):
    """The rows of one model: ``make()`` -> (model, nll(batch), sample(n), integration module)."""
    make = make or (lambda: PEERS[peer](kind))
    try:
        torch.manual_seed(0)
        model, nll, sample, integ = make()
    except ImportError as exc:
        return [_row(peer, kind, "-", "-", None, error=f"ImportError: {exc}")]
    version = integ.INTEGRATION.version()
    switch, floor = _Switch(integ), _Floor()
    width = SBI_THETA + SBI_X if peer == "sbi" else FEATURES
    batch = SBI_BATCH if peer == "sbi" else BATCH
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        nll(x).backward()

    def draw():
        with torch.no_grad():
            return sample(BATCH)

    def plain():
        floor.off()
        switch.off()

    def fast():
        floor.off()
        switch.on()

    def noop():
        floor.on()
        switch.on()

    cases = {
        "train_step": ({"plain": (plain, step), "accelerated": (fast, step)},
                       "zero_grad + NLL of one batch + backward (no optimizer update)"),
        "sample": ({"plain": (plain, draw), "accelerated": (fast, draw)},
                   f"one call drawing {BATCH} samples under no_grad"),
    }
    if fused:
        for impls, _ in cases.values():
            impls["floor: spline a no-op"] = (noop, impls["accelerated"][1])
    else:
        rounds = min(rounds, UNCHANGED_ROUNDS)
    if compile and peer == "zuko" and kind == "coupling":
        compiled = torch.compile(nll)

        def compiled_step():
            model.zero_grad(set_to_none=True)
            compiled(x).backward()

        cases["train_step"][0]["torch.compile"] = (plain, compiled_step)
    rows = []
    try:
        for case, (impls, what) in cases.items():
            torch.manual_seed(0)
            rows += _timed_rows(peer, kind, case, interleave(impls, rounds, WARMUP), version, what)
        plain()
        if fused:
            dev, plain64, fast64, finite = _trajectory(make, switch, width, TRAJECTORY_STEPS)
            rows.append(_row(peer, kind, "loss_trajectory", "accelerated", version, steps=TRAJECTORY_STEPS,
                             max_rel_deviation=dev, finite=finite, within_1e_4=dev <= 1e-4,
                             plain_vs_float64=plain64, accelerated_vs_float64=fast64,
                             timed="none: 50 Adam steps (lr 1e-3, batch 128) plain and accelerated in float32 "
                                   "and plain in float64, same seed and batches"))
    finally:
        floor.off()
        switch.off()
    return rows


class NullTracker:
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


NPE_ESTIMATORS = ("nsf", "zuko_nsf", "maf_rqs", "zuko_ncsf", "maf")  # the spline ones and sbi's default


def _npe_rows(name, quick, rounds):
    """A whole sbi NPE training run with estimator ``name``: plain, accelerated and the floor,
    whole runs alternating (the order rotating), each from the same seed."""
    import sbi
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    import fastflow.integrations.sbi as integ

    epochs = 2 if quick else SBI_EPOCHS
    sims = 500 if quick else SBI_SIMULATIONS
    theta, xs = _simulate(sims, torch.Generator().manual_seed(0))
    prior = BoxUniform(-2 * torch.ones(SBI_THETA), 2 * torch.ones(SBI_THETA))
    switch, floor = _Switch(integ), _Floor()
    summaries = {}

    def train(impl):
        def go():
            torch.manual_seed(0)
            npe = NPE(prior=prior, density_estimator=name, tracker=NullTracker(), show_progress_bars=False)
            npe.append_simulations(theta, xs)
            npe.train(max_num_epochs=epochs, stop_after_epochs=10**6, training_batch_size=SBI_BATCH)
            summaries.setdefault(impl, {k: list(npe._summary[k]) for k in ("training_loss", "validation_loss")})
        return go

    fused = integ.ESTIMATORS[name].op is not None
    impls = {"plain": (lambda: (floor.off(), switch.off()), train("plain")),
             "accelerated": (lambda: (floor.off(), switch.on()), train("accelerated"))}
    if fused:
        impls["floor: spline a no-op"] = (lambda: (floor.on(), switch.on()), train("floor"))
    try:
        stats = interleave(impls, rounds, warmup=1)
    finally:
        floor.off()
        switch.off()
    dev = scaled = within = None
    if "plain" in summaries and "accelerated" in summaries:
        a = {k: torch.tensor(v, dtype=torch.float64) for k, v in summaries["plain"].items()}
        b = {k: torch.tensor(v, dtype=torch.float64) for k, v in summaries["accelerated"].items()}
        rel = torch.stack([(a[k] - b[k]).abs() / a[k].abs() for k in a]).amax(0)  # per epoch
        dev = float(rel.max())
        # NPE losses cross 0 late in training, where a relative deviation means little: also
        # against the run's scale, and how many epochs agree to 1e-4 before float32 drift sets in
        scaled = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
        within = int((rel <= 1e-4).int().cumprod(0).sum())
    what = (f"npe.train(): {epochs} epochs (fixed) on {sims} simulations, training batch {SBI_BATCH}, "
            f"sbi's {name} at its defaults")
    rows = []
    for row in _timed_rows("sbi", name, "npe_run", stats, sbi.__version__, what):
        row.update(n=sims, epochs=epochs, simulations=sims, training_batch_size=SBI_BATCH)
        if row["impl"] != "floor: spline a no-op":
            row.update(loss_max_rel_deviation=dev, loss_max_dev_vs_scale=scaled, epochs_within_1e_4=within,
                       losses=summaries.get(row["impl"]))
        rows.append(row)
    return rows


def _sbi_rows(quick, rounds, estimators=None):
    """Every sbi estimator: train step, sampling, loss trajectory; NPE runs for NPE_ESTIMATORS."""
    try:
        import sbi  # noqa: F401

        import fastflow.integrations.sbi as integ
    except ImportError as exc:
        msg = f"sbi not installed ({exc}); pip install sbi to run this case"
        print(f"integrations: skipping the sbi case: {msg}")
        return [{"op": "sbi", "mode": "-", "n": SBI_BATCH, "impl": "-", "peer": "sbi", "skipped": msg}]
    rows = []
    names = estimators or (("nsf", "zuko_nsf") if quick else tuple(integ.ESTIMATORS))
    for name in names:
        rows += _peer_rows("sbi", name, rounds, False, make=lambda name=name: _sbi(name),
                           fused=integ.ESTIMATORS[name].op is not None)
    for name in [] if estimators else NPE_ESTIMATORS[:1] if quick else NPE_ESTIMATORS:
        try:
            rows += _npe_rows(name, quick, 2 if quick else SBI_RUNS)
        except Exception as exc:  # sbi's API moves between versions: a result, not a lost run
            rows.append(_row("sbi", name, "npe_run", "-", None, error=f"{type(exc).__name__}: {exc}"))
    return rows


def run(device="cpu", repeats=MIN_ROUNDS, quick=False, peers=None, compile=True, sbi=True, estimators=None, **_):
    """Rows of every case; ``estimators``: only these sbi estimators (no peer models, no NPE runs)."""
    if torch.device(device).type != "cpu":
        raise ValueError("fastflow bench integrations: CPU only (the peers' models, float32, one process)")
    rounds = 3 if quick else max(int(repeats), MIN_ROUNDS)
    rows = [{"op": "source", "mode": "-", "n": 0, "impl": "-", **source()}]
    for peer in () if estimators else peers or PEERS:
        for kind in KINDS.get(peer, ("coupling", "autoregressive")):
            rows += _peer_rows(peer, kind, rounds, compile and not quick, fused=FUSED.get((peer, kind), True))
    if sbi or estimators:
        rows += _sbi_rows(quick, rounds, estimators)
    return rows


TABLE_COLUMNS = ["op", "mode", "impl", "median_s", "min_s", "max_s", "speedup_vs_plain", "paired_speedup",
                 "max_rel_deviation", "plain_vs_float64", "accelerated_vs_float64", "loss_max_rel_deviation",
                 "loss_max_dev_vs_scale", "epochs_within_1e_4", "version"]
