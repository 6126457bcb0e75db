"""``fastflow bench integrations``: the peers' own NSF models, plain vs accelerated by
``fastflow.integrations`` vs the peer under ``torch.compile``.

Per peer (zuko, nflows, normflows) and structure (coupling, autoregressive): a training step
(negative log-likelihood of a batch, forward + backward) and sampling, 8 features, 5 transforms,
hidden (64, 64), 8 bins, batch 512, float32, timed in alternating rounds (time_interleaved).
"""

from __future__ import annotations

import torch

from fastflow.bench import time_interleaved

FEATURES, TRANSFORMS, HIDDEN, BINS, BATCH = 8, 5, 64, 8, 512


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


def run(device="cpu", repeats=3, quick=False, peers=None, compile=True, **_):
    rows = []
    for peer in peers or PEERS:
        for kind in ("coupling", "autoregressive"):
            try:
                torch.manual_seed(0)
                model, nll, sample, integ = PEERS[peer](kind)
            except ImportError as exc:
                rows.append({"op": f"{peer} NSF {kind}", "mode": "-", "n": BATCH, "impl": "-", "peer": peer,
                             "error": f"ImportError: {exc}"})
                continue
            version = integ.INTEGRATION.version()
            x = torch.randn(BATCH, FEATURES)

            def step(loss_fn=nll, model=model):
                model.zero_grad(set_to_none=True)
                loss_fn(x).backward()

            def accelerated(fn, integ=integ):
                def call():
                    with integ.accelerate():
                        return fn()
                return call

            def draw(sample=sample):
                with torch.no_grad():
                    return sample(BATCH)

            cases = {"train_step": {"plain": step, "accelerated": accelerated(step)},
                     "sample": {"plain": draw, "accelerated": accelerated(draw)}}
            if compile and not quick and kind == "coupling" and peer == "zuko":
                compiled = torch.compile(nll)
                cases["train_step"]["torch.compile"] = lambda: (model.zero_grad(set_to_none=True),
                                                                compiled(x).backward())
            for case, calls in cases.items():
                stats = time_interleaved(calls, device, repeats=2 if quick else repeats, warmup=1)
                base = stats.get("plain", {}).get("median_s")
                for impl, st in stats.items():
                    row = {"op": f"{peer} NSF {kind}", "mode": case, "n": BATCH, "peer": peer, "version": version,
                           "model": f"NSF {kind}", "case": case, "impl": impl,
                           "batch": BATCH, "features": FEATURES, "transforms": TRANSFORMS, "bins": BINS,
                           "dtype": "float32", **{k: v for k, v in st.items() if k != "times"}}
                    if base and "median_s" in st:
                        row["speedup_vs_plain"] = base / st["median_s"]
                    rows.append(row)
    return rows


TABLE_COLUMNS = ["op", "mode", "impl", "median_s", "speedup_vs_plain", "version"]
