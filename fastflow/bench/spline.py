"""Spline suite: every available fastflow backend, nflows' function and zuko's spline on the
same inputs: forward, inverse and forward+backward, K bins, float32."""

from __future__ import annotations

import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, resolve_backend
from fastflow.bench import time_interleaved
from fastflow.ops import rq_spline

SUITE = "spline"
DEFAULT_SIZES = (2**16, 2**20, 2**22)
QUICK_SIZES = (2**12, 2**16)


def _inputs(n, k, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.6
    uw, uh = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    ud = torch.randn(n, k - 1, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, uw, uh, ud)]


def _impls(device, dtype):
    """name -> (forward(x, params, inverse) -> (y, lad)); only what runs here."""
    impls = {}
    probe = torch.empty(1, device=device, dtype=dtype)
    for name in BACKENDS:
        try:
            resolve_backend("rq_spline", probe, name)
        except BackendUnavailableError:
            continue
        impls[name] = lambda x, p, inv, name=name: rq_spline(x, *p, inverse=inv, backend=name)
    try:
        from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline as nfl

        impls["nflows"] = lambda x, p, inv: nfl(x, *p, inverse=inv, tails="linear", tail_bound=1.0)
    except ImportError:
        pass
    try:
        from zuko.transforms import MonotonicRQSTransform

        def zuko_spline(x, p, inv):
            t = MonotonicRQSTransform(*p, bound=1.0)
            return (t.inv if inv else t).call_and_ladj(x)

        impls["zuko"] = zuko_spline
    except ImportError:
        pass
    return impls


def run(device="cpu", sizes=None, k=8, dtype=torch.float32, repeats=5, quick=False, impls=None, modes=None):
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    modes = modes or ("forward", "inverse", "forward+backward")
    available = _impls(device, dtype)
    if impls:
        available = {n: f for n, f in available.items() if n in impls}
    rows = []
    for n in sizes:
        x, uw, uh, ud = _inputs(n, k, device, dtype)
        with torch.no_grad():
            y = rq_spline(x, uw, uh, ud)[0]
        for mode in modes:
            calls = {}
            for name, fn in available.items():
                if mode == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(x, (uw, uh, ud), False)
                elif mode == "inverse":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(y, (uw, uh, ud), True)
                else:
                    leaves = [t.detach().clone().requires_grad_(True) for t in (x, uw, uh, ud)]

                    def call(fn=fn, leaves=leaves):
                        out, lad = fn(leaves[0], leaves[1:], False)
                        (out.sum() + lad.sum()).backward()
                        for t in leaves:
                            t.grad = None
                calls[name] = call
            # In alternation, so that the ratios against the peers compare times taken side by
            # side (a peer failing on valid input is a result, not a crash).
            for name, stats in time_interleaved(calls, device, repeats=repeats, warmup=1).items():
                row = {"op": "rq_spline", "impl": name, "mode": mode, "n": n, "k": k,
                       "dtype": str(dtype).replace("torch.", ""), **stats}
                if "median_s" in stats:
                    row["ns_per_element"] = stats["median_s"] / n * 1e9
                rows.append(row)
    return rows


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the speed-up chart, next to it."""
    from pathlib import Path

    from fastflow.bench import plot_speedups

    return [plot_speedups(rows, Path(json_path).with_suffix(".png"), "nflows",
                          "Rational-quadratic spline: fastflow backends and zuko against nflows")]
