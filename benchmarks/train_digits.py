"""Train NSF (coupling) and Glow on the bundled 8x8 digits with fastflow and with nflows (the
same architectures from nflows' pieces), with the same data, seeds, optimiser and step budget;
report held-out log-likelihood (nats, and bits/dim on the 0..16 integer scale) and training-step
times, and write JSON to benchmarks/results/train_digits.json.

    python benchmarks/train_digits.py --steps 1000 --seeds 0 1 2

The fastflow and nflows models of one architecture are trained side by side: each step, both
take the same minibatch, one after the other, so that the machine's drift (large on shared
VMs) hits both alike. The speed figure is the median over steps of the per-step ratio
``nflows time / fastflow time``; the likelihoods are compared across seeds ("same within noise":
the difference of the means is within two standard errors of that difference).

normflows' Glow is not used: its GlowBlock/MultiscaleFlow uses a different, learned-prior
multi-scale head, so it would not be the same architecture; nflows' ActNorm,
OneByOneConvolution, AffineCouplingTransform, SqueezeTransform and MultiscaleCompositeTransform
build exactly the Glow that ``fastflow.flows.build("glow")`` builds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fastflow
import fastflow.data as data
from fastflow.flows import build


# ------------------------------------------------------------------------------------ nflows
def nflows_nsf(d, num_layers, hidden, num_blocks, num_bins, tail_bound):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import CompositeTransform, PiecewiseRationalQuadraticCouplingTransform, RandomPermutation
    from nflows.utils import torchutils

    layers = []
    for i in range(num_layers):
        if i > 0:
            layers.append(RandomPermutation(d))
        layers.append(PiecewiseRationalQuadraticCouplingTransform(
            mask=torchutils.create_alternating_binary_mask(d, even=(i % 2 == 0)),
            transform_net_create_fn=lambda i_, o_: ResidualNet(i_, o_, hidden, num_blocks=num_blocks),
            num_bins=num_bins, tails="linear", tail_bound=tail_bound))
    return Flow(CompositeTransform(layers), StandardNormal([d]))


class _GlowNet(nn.Module):
    def __init__(self, i, o, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(i, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                                 nn.ReLU(), nn.Conv2d(hidden, o, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, context=None):
        return self.net(x)


def nflows_glow(shape, levels, depth, hidden):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import (ActNorm, AffineCouplingTransform, CompositeTransform,
                                   MultiscaleCompositeTransform, OneByOneConvolution, SqueezeTransform)

    c, h, w = shape
    mst = MultiscaleCompositeTransform(num_transforms=levels, split_dim=1)
    for _ in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        steps = [SqueezeTransform()]
        for k in range(depth):
            mask = torch.ones(c)
            mask[: c // 2] = -1  # nflows: > 0 transformed; the second half, like fastflow's channel_mask
            if k % 2:
                mask = -mask
            steps += [ActNorm(c), OneByOneConvolution(c),
                      AffineCouplingTransform(mask, lambda i_, o_: _GlowNet(i_, o_, hidden))]
        new = mst.add_transform(CompositeTransform(steps), (c, h, w))
        if new is not None:
            c, h, w = new
    return Flow(mst, StandardNormal([math.prod(shape)]))


# ------------------------------------------------------------------------------------ harness
def _step(flow, opt, x):
    t0 = time.perf_counter()
    loss = -flow.log_prob(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
    opt.step()
    return time.perf_counter() - t0


def _evaluate(flow, test_x, dataset):
    flow.eval()
    with torch.no_grad():
        ll = float(flow.log_prob(test_x).mean())
    ll_int = ll + data.dequantization_log_det(dataset)
    return {"test_log_likelihood_nats": ll, "test_log_likelihood_nats_integer_scale": ll_int,
            "test_bits_per_dim": -ll_int / (64 * math.log(2))}


def train_pair(flows, train_x, test_x, dataset, steps, batch, lr, seed):
    """Trains ``flows`` (name -> Flow) side by side on the same minibatches; per-model results
    and the per-step times (seconds)."""
    opts = {k: torch.optim.Adam(f.parameters(), lr) for k, f in flows.items()}
    g = torch.Generator().manual_seed(seed)
    times = {k: [] for k in flows}
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=g)
        x = train_x[idx]
        for k, f in flows.items():
            times[k].append(_step(f, opts[k], x))
    skip = min(10, steps // 2)  # the first steps include numba JIT loading and ActNorm's init
    out = {}
    for k, f in flows.items():
        r = _evaluate(f, test_x, dataset)
        r.update(median_step_ms=1e3 * statistics.median(times[k][skip:]), first_step_ms=1e3 * times[k][0],
                 steps=steps, parameters=sum(p.numel() for p in f.parameters()))
        out[k] = r
    return out, {k: v[skip:] for k, v in times.items()}


def _summary(values):
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": m, "std": sd, "values": values}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="+", default=["nsf", "glow"], choices=["nsf", "glow"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_digits.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    nsf_kw = dict(num_layers=5, hidden_features=128, num_blocks=2, num_bins=8, tail_bound=3.0)
    glow_kw = dict(levels=2, depth=4, hidden_channels=64)
    sets = {"nsf": ("digits", data.load("digits", "train"), data.load("digits", "test")),
            "glow": ("digits-image", data.load("digits-image", "train"), data.load("digits-image", "test"))}

    def make(model, lib, seed):
        torch.manual_seed(seed)
        if model == "nsf":
            if lib == "fastflow":
                return build("nsf", (64,), **nsf_kw)
            return nflows_nsf(64, nsf_kw["num_layers"], nsf_kw["hidden_features"], nsf_kw["num_blocks"],
                              nsf_kw["num_bins"], nsf_kw["tail_bound"])
        if lib == "fastflow":
            return build("glow", (1, 8, 8), **glow_kw)
        return nflows_glow((1, 8, 8), glow_kw["levels"], glow_kw["depth"], glow_kw["hidden_channels"])

    runs, speed, lls = {}, {}, {}
    for model in args.models:
        dataset, tr, te = sets[model]
        ratios = []
        for seed in args.seeds:
            flows = {lib: make(model, lib, seed) for lib in ("fastflow", "nflows")}
            res, times = train_pair(flows, tr, te, dataset, args.steps, args.batch, args.lr, seed)
            ratios += [b / a for a, b in zip(times["fastflow"], times["nflows"])]
            for lib, r in res.items():
                runs[f"{model}/{lib}/seed{seed}"] = r
                lls.setdefault(model, {}).setdefault(lib, []).append(r["test_log_likelihood_nats"])
                print(f"{model:5s} {lib:9s} seed {seed}: params={r['parameters']:7d} "
                      f"test LL={r['test_log_likelihood_nats']:8.2f} nats ({r['test_bits_per_dim']:.3f} bits/dim)  "
                      f"median step {r['median_step_ms']:.2f} ms", flush=True)
        step_ms = {lib: statistics.median([runs[f"{model}/{lib}/seed{s}"]["median_step_ms"] for s in args.seeds])
                   for lib in ("fastflow", "nflows")}
        speed[model] = {"paired_median_ratio_nflows_over_fastflow": statistics.median(ratios),
                        "median_step_ms": step_ms}
        print(f"{model}: step-time speedup fastflow vs nflows (median of per-step ratios) = "
              f"{speed[model]['paired_median_ratio_nflows_over_fastflow']:.3f}x", flush=True)

    comparison = {}
    for model, by_lib in lls.items():
        f, n = _summary(by_lib["fastflow"]), _summary(by_lib["nflows"])
        k = len(by_lib["fastflow"])
        se = math.sqrt((f["std"] ** 2 + n["std"] ** 2) / k) if k > 1 else float("nan")
        diff = f["mean"] - n["mean"]
        comparison[model] = {"fastflow": f, "nflows": n, "difference_of_means": diff, "standard_error": se,
                             "same_within_noise": bool(abs(diff) <= 2 * se) if k > 1 else None}
        print(f"{model}: test LL fastflow {f['mean']:.2f} +- {f['std']:.2f}, nflows {n['mean']:.2f} +- {n['std']:.2f} "
              f"nats; difference {diff:+.2f} (2 SE = {2 * se:.2f})", flush=True)

    import nflows

    report = {
        "benchmark": "train_digits",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"fastflow": fastflow.__version__, "torch": torch.__version__,
                     "nflows": getattr(nflows, "__version__", None) or _dist_version("nflows"),
                     "python": platform.python_version()},
        "config": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": args.seeds,
                   "nsf": nsf_kw, "glow": glow_kw,
                   "data": "fastflow.data digits (64-D, (x+u)/17) and digits-image (1x8x8); train/test splits",
                   "timing": "fastflow and nflows models stepped alternately on the same minibatch; the first "
                             "10 steps are skipped"},
        "results": runs,
        "speed": speed,
        "log_likelihood": comparison,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
