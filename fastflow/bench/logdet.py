"""Log-det scaling suite: the O(D) log-det of the LU parameterisation against the O(D^3) routes.

For D = 8, 16, ..., 1024 (one sample through a D-dimensional LU linear layer, Glow's
``W = P L (U + diag(sign*exp(log_s)))``) it times

- ``fastflow_logdet``: the log-det fastflow's LU ops return, ``sum(log_s)`` (the same function
  :func:`fastflow.ops.lu_linear` calls), O(D);
- ``fastflow_layer``: the whole ``lu_linear`` forward of the sample (output and log-det); the
  output is a matrix-vector product, O(D^2), applied factor by factor for a single sample;
- ``slogdet``: ``torch.linalg.slogdet(W)`` of the assembled weight, O(D^3);
- ``naive_jacobian``: the generic route for an arbitrary flow layer: ``torch.func.jacrev`` of the
  dense layer for the sample (``W`` assembled from its factors inside the layer), then ``slogdet``
  of the D x D Jacobian, O(D^3). It stops growing D once one evaluation exceeds ``NAIVE_CAP_S``.

Log-log slopes are fitted (``numpy.polyfit``) on ``D >= FIT_FROM``; the ``after`` hook draws a
log-log plot (matplotlib, Agg) with the slopes in the legend next to the JSON file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastflow.bench import save_figure, time_fn
from fastflow.kernels.reference import lu as ref
from fastflow.ops import lu_linear

SUITE = "logdet"
DEFAULT_SIZES = tuple(2**k for k in range(3, 11))  # 8 .. 1024
QUICK_SIZES = (8, 16, 32, 64, 128)
FIT_FROM = 256  # below this, per-call overhead (not the O(D^k) work) dominates every route on a CPU
NAIVE_CAP_S = 3.0
IMPLS = ("fastflow_logdet", "fastflow_layer", "slogdet", "naive_jacobian")
TABLE_COLUMNS = ["impl", "mode", "n", "median_s", "slope", "fit_sizes", "ratio_vs_fastflow_logdet"]


def make_case(d, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(1, d, generator=g),
        "lower": torch.randn(d, d, generator=g) / math.sqrt(d),
        "upper": torch.randn(d, d, generator=g) / math.sqrt(d),
        "log_s": torch.randn(d, generator=g) * 0.1,
        "sign": torch.where(torch.rand(d, generator=g) > 0.5, 1.0, -1.0),
    }
    t = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    t["perm"] = torch.randperm(d, generator=g).to(device)
    return t


def callables(t):
    """impl -> zero-argument callable returning the log-det (shared with benchmarks/bench_logdet.py)."""
    lu = (t["perm"], t["lower"], t["upper"], t["log_s"], t["sign"])
    w = ref.weight(*lu)

    def layer(v):  # the dense layer, one sample
        return ref.weight(*lu) @ v

    def naive():
        jac = torch.func.jacrev(layer)(t["x"][0])
        return torch.linalg.slogdet(jac)[1]

    return {
        "fastflow_logdet": lambda: ref.logabsdet(t["log_s"], None, 1, False),
        "fastflow_layer": lambda: lu_linear(t["x"], *lu)[1],
        "slogdet": lambda: torch.linalg.slogdet(w)[1],
        "naive_jacobian": naive,
    }


def fit_slope(ns, times):
    import numpy as np

    return float(np.polyfit(np.log(ns), np.log(times), 1)[0])


def run(device="cpu", sizes=None, repeats=5, quick=False, impls=None, dtype=torch.float32):
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    chosen = [i for i in IMPLS if not impls or i in impls]
    rows, capped = [], {}
    with torch.no_grad():
        for d in sizes:
            t = make_case(d, device, dtype)
            fns = callables(t)
            for name in chosen:
                base = {"op": "logdet", "impl": name, "mode": "single_sample", "n": d,
                        "dtype": str(dtype).replace("torch.", "")}
                if name in capped:
                    rows.append({**base, "skipped": f"one evaluation took {capped[name]:.2f} s at a smaller D "
                                                    f"(cap {NAIVE_CAP_S} s)"})
                    continue
                fn = fns[name]
                if name == "naive_jacobian":
                    with torch.enable_grad():
                        stats = time_fn(fn, device, repeats=repeats, warmup=1, min_time=0.2)
                else:
                    stats = time_fn(fn, device, repeats=repeats, warmup=2, min_time=0.2)
                rows.append({**base, **stats})
                if name == "naive_jacobian" and stats["median_s"] > NAIVE_CAP_S:
                    capped[name] = stats["median_s"]
    return rows + summarize(rows)


def summarize(rows):
    """Slope rows (log-log fit on D >= FIT_FROM, and on all sizes) and ratios at the largest D."""
    out = []
    timed = [r for r in rows if r.get("median_s") and r.get("mode") == "single_sample"]
    for name in IMPLS:
        pts = sorted((r["n"], r["median_s"]) for r in timed if r["impl"] == name)
        if len(pts) < 2:
            continue
        big = [p for p in pts if p[0] >= FIT_FROM]
        for label, sel in (("slope", big), ("slope_all_sizes", pts)):
            if len(sel) >= 2:
                out.append({"op": "logdet", "impl": name, "mode": label, "n": sel[-1][0],
                            "slope": fit_slope(*zip(*sel)), "fit_sizes": [p[0] for p in sel]})
    largest = max((r["n"] for r in timed), default=None)
    ours = {r["impl"]: r for r in timed if r["n"] == largest}
    base = ours.get("fastflow_logdet")
    for name in IMPLS:
        pts = [r for r in timed if r["impl"] == name]
        if not pts or not base:
            continue
        last = max(pts, key=lambda r: r["n"])
        # Ratio at the largest D this impl was measured at, against fastflow at that same D.
        ff = next(r for r in timed if r["impl"] == "fastflow_logdet" and r["n"] == last["n"])
        out.append({"op": "logdet", "impl": name, "mode": "ratio_at_largest", "n": last["n"],
                    "median_s": last["median_s"], "ratio_vs_fastflow_logdet": last["median_s"] / ff["median_s"]})
    return out


def plot(rows, path):
    """Log-log plot of the timings with the fitted slopes in the legend; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slopes = {r["impl"]: r["slope"] for r in rows if r.get("mode") == "slope"}
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, marker in zip(IMPLS, "osD^"):
        pts = sorted((r["n"], r["median_s"]) for r in rows
                     if r.get("impl") == name and r.get("mode") == "single_sample" and r.get("median_s"))
        if not pts:
            continue
        ns, ts = zip(*pts)
        label = f"{name} (slope {slopes[name]:.2f} for D>={FIT_FROM})" if name in slopes else name
        ax.loglog(ns, ts, marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("D (dimension of the LU linear layer)")
    ax.set_ylabel("median time per evaluation [s]")
    ax.set_title("log|det J| of one LU layer sample: O(D) vs O(D^3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the plot, next to it."""
    return [plot(rows, Path(json_path).with_suffix(".png"))]
