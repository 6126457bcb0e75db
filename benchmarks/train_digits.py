"""Train NSF (coupling) and Glow on the bundled 8x8 digits with fastflow and with nflows (the
same architectures from nflows' pieces), with the same data, seed, optimiser and step budget;
report held-out log-likelihood (nats, and bits/dim on the 0..16 integer scale) and the median
training-step time, and write JSON to benchmarks/results/train_digits.json.

    python benchmarks/train_digits.py --steps 300

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
def train(flow, train_x, test_x, steps, batch, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=g)
        t0 = time.perf_counter()
        loss = -flow.log_prob(train_x[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    flow.eval()
    with torch.no_grad():
        ll = float(flow.log_prob(test_x).mean())
    ll_int = ll + data.dequantization_log_det("digits")
    return {
        "test_log_likelihood_nats": ll,
        "test_log_likelihood_nats_integer_scale": ll_int,
        "test_bits_per_dim": -ll_int / (64 * math.log(2)),
        # the first steps include JIT compilation (numba) and ActNorm's init: skipped
        "median_step_ms": 1e3 * statistics.median(times[min(10, steps // 2):]),
        "first_step_ms": 1e3 * times[0],
        "steps": steps,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_digits.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    nsf_kw = dict(num_layers=5, hidden_features=128, num_blocks=2, num_bins=8, tail_bound=3.0)
    glow_kw = dict(levels=2, depth=4, hidden_channels=64)
    tab_tr, tab_te = data.load("digits", "train"), data.load("digits", "test")
    img_tr, img_te = data.load("digits-image", "train"), data.load("digits-image", "test")

    runs = {}
    torch.manual_seed(args.seed)
    runs["nsf/fastflow"] = (build("nsf", (64,), **nsf_kw), tab_tr, tab_te)
    torch.manual_seed(args.seed)
    runs["nsf/nflows"] = (nflows_nsf(64, nsf_kw["num_layers"], nsf_kw["hidden_features"], nsf_kw["num_blocks"],
                                     nsf_kw["num_bins"], nsf_kw["tail_bound"]), tab_tr, tab_te)
    torch.manual_seed(args.seed)
    runs["glow/fastflow"] = (build("glow", (1, 8, 8), **glow_kw), img_tr, img_te)
    torch.manual_seed(args.seed)
    runs["glow/nflows"] = (nflows_glow((1, 8, 8), glow_kw["levels"], glow_kw["depth"], glow_kw["hidden_channels"]),
                           img_tr, img_te)

    results = {}
    for name, (flow, tr, te) in runs.items():
        n_params = sum(p.numel() for p in flow.parameters())
        r = train(flow, tr, te, args.steps, args.batch, args.lr, args.seed)
        r["parameters"] = n_params
        results[name] = r
        print(f"{name:14s} params={n_params:8d} test LL={r['test_log_likelihood_nats']:9.2f} nats "
              f"({r['test_bits_per_dim']:.3f} bits/dim)  median step {r['median_step_ms']:.2f} ms", flush=True)
    ratios = {m: results[f"{m}/nflows"]["median_step_ms"] / results[f"{m}/fastflow"]["median_step_ms"]
              for m in ("nsf", "glow")}
    for m, r in ratios.items():
        print(f"{m}: step-time speedup fastflow vs nflows = {r:.2f}x")

    import nflows

    report = {
        "benchmark": "train_digits",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"fastflow": fastflow.__version__, "torch": torch.__version__,
                     "nflows": getattr(nflows, "__version__", "?"), "python": platform.python_version()},
        "config": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                   "nsf": nsf_kw, "glow": glow_kw,
                   "data": "fastflow.data digits (64-D, (x+u)/17) and digits-image (1x8x8); train/test splits"},
        "results": results,
        "speedup_step_time_vs_nflows": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
