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

The residual-flow and continuous-flow routes (issue 17), on one residual block ``y = x + g(x)``
with ``g`` a spectrally normalised one-hidden-layer LipSwish MLP of width ``D`` (``coeff=0.9``,
weights on the bound, ``||J_g||`` about 0.7; a single sample, float32):

- ``resflow_exact``: ``log|det(I + J_g)|`` by the slogdet of the autograd Jacobian (``D``
  vector-Jacobian products, then slogdet), O(D^3): the oracle;
- ``resflow_series``: the power series truncated at 10 terms, Hutchinson (Gaussian) traces;
- ``resflow_roulette``: the unbiased Russian-roulette estimator (2 exact terms + Geometric(0.5));
- ``trace_exact`` / ``trace_hutchinson``: ``tr(J_g)``, the per-evaluation cost of a CNF's
  log-det integrand, exactly (``D`` VJPs) or with one Rademacher probe (one VJP).

Each estimator row also carries its error against the exact value from ``ERROR_DRAWS`` draws:
``bias`` (mean error), ``std`` (spread of one draw) and ``rmse``, also relative to ``|exact|``.

Log-log slopes are fitted (``numpy.polyfit``) on ``D >= FIT_FROM``; the ``after`` hook draws a
log-log plot (matplotlib, Agg) with the slopes in the legend next to the JSON file (and a second
one, ``*_residual.png``, of the residual routes' time and error).
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
RESIDUAL_IMPLS = ("resflow_exact", "resflow_series", "resflow_roulette", "trace_exact", "trace_hutchinson")
RESIDUAL_MODE = "residual_single_sample"
ERROR_DRAWS = 32
TABLE_COLUMNS = ["impl", "mode", "n", "median_s", "slope", "fit_sizes", "ratio_vs_fastflow_logdet",
                 "speedup_vs_exact", "rel_bias", "rel_bias_se", "rel_std", "rel_rmse"]


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


def make_residual_case(d, device="cpu", dtype=torch.float32, seed=0):
    """One residual block with ``||J_g||`` near its budget and one sample ``x`` ``(1, D)``."""
    from fastflow.nn.residual import ResidualBlock

    torch.manual_seed(seed)
    blk = ResidualBlock(d, hidden_features=d, num_hidden=1, coeff=0.9)
    with torch.no_grad():
        for lin in blk.net.linears:
            lin.weight.mul_(20.0)
            lin.bias.fill_(3.0)  # pre-activations where LipSwish's slope is near its bound
        blk.net.linears[-1].weight.copy_(blk.net.linears[0].weight.t())
    blk.train()
    for _ in range(30):  # power iterations onto the rescaled weights
        blk.net(torch.zeros(1, d))
    blk = blk.eval().to(device=device, dtype=dtype)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    return {"block": blk, "x": x}


def residual_callables(case):
    """impl -> zero-argument callable returning the (estimated) value, the forward ``g(x)`` included."""
    from fastflow.nn.residual import residual_logdet

    net, x0 = case["block"].net, case["x"]

    def route(estimator, **kw):
        def call():
            with torch.enable_grad():
                x = x0.detach().requires_grad_(True)
                return residual_logdet(net(x), x, estimator, create_graph=False, **kw)
        return call

    def trace(exact):
        def call():
            with torch.enable_grad():
                x = x0.detach().requires_grad_(True)
                gx = net(x)
                if exact:
                    return sum(torch.autograd.grad(gx[:, i].sum(), x, retain_graph=True)[0][:, i]
                               for i in range(x.shape[1]))
                e = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
                return (torch.autograd.grad(gx, x, e)[0] * e).sum(1)
        return call

    return {
        "resflow_exact": route("exact"),
        "resflow_series": route("series", n_terms=10),
        "resflow_roulette": route("roulette", n_exact_terms=2, geom_p=0.5),
        "trace_exact": trace(True),
        "trace_hutchinson": trace(False),
    }


def _errors(fn, exact, draws):
    vals = torch.stack([fn().detach().double().reshape(()) for _ in range(draws)])
    err = vals - float(exact)
    scale = max(abs(float(exact)), 1e-12)
    bias, std, rmse = float(err.mean()), float(err.std()), float(err.pow(2).mean().sqrt())
    return {"exact": float(exact), "bias": bias, "std": std, "rmse": rmse, "rel_bias": bias / scale,
            "rel_bias_se": std / scale / draws**0.5, "rel_std": std / scale, "rel_rmse": rmse / scale,
            "draws": draws}


def run_residual(device="cpu", sizes=None, repeats=5, quick=False, impls=None, dtype=torch.float32):
    """Time and error rows of the residual / continuous log-det routes (``mode=RESIDUAL_MODE``)."""
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    chosen = [i for i in RESIDUAL_IMPLS if not impls or i in impls]
    rows, capped = [], {}
    for d in sizes:
        fns = residual_callables(make_residual_case(d, device, dtype))
        exact = {"resflow": fns["resflow_exact"]().detach(), "trace": fns["trace_exact"]().detach()}
        for name in chosen:
            base = {"op": "logdet", "impl": name, "mode": RESIDUAL_MODE, "n": d,
                    "dtype": str(dtype).replace("torch.", "")}
            if name in capped:
                rows.append({**base, "skipped": f"one evaluation took {capped[name]:.2f} s at a smaller D "
                                                f"(cap {NAIVE_CAP_S} s)"})
                continue
            stats = time_fn(fns[name], device, repeats=repeats, warmup=1, min_time=0.2)
            row = {**base, **stats}
            if not name.endswith("exact"):
                row.update(_errors(fns[name], exact[name.split("_")[0]], ERROR_DRAWS))
            rows.append(row)
            if name.endswith("exact") and stats["median_s"] > NAIVE_CAP_S:
                capped[name] = stats["median_s"]
    return rows + summarize_residual(rows)


def summarize_residual(rows):
    """Slopes (D >= FIT_FROM and all sizes) and, at the largest D, each route's speed-up over the exact one."""
    out = []
    timed = [r for r in rows if r.get("median_s") and r.get("mode") == RESIDUAL_MODE]
    for name in RESIDUAL_IMPLS:
        pts = sorted((r["n"], r["median_s"]) for r in timed if r["impl"] == name)
        big = [p for p in pts if p[0] >= FIT_FROM]
        for label, sel in (("residual_slope", big), ("residual_slope_all_sizes", pts)):
            if len(sel) >= 2:
                out.append({"op": "logdet", "impl": name, "mode": label, "n": sel[-1][0],
                            "slope": fit_slope(*zip(*sel)), "fit_sizes": [p[0] for p in sel]})
    for name in RESIDUAL_IMPLS:
        pts = [r for r in timed if r["impl"] == name]
        if not pts:
            continue
        last = max(pts, key=lambda r: r["n"])
        ref_name = "resflow_exact" if name.startswith("resflow") else "trace_exact"
        ref = next((r for r in timed if r["impl"] == ref_name and r["n"] == last["n"]), None)
        row = {"op": "logdet", "impl": name, "mode": "residual_at_largest", "n": last["n"],
               "median_s": last["median_s"]}
        if ref:
            row["speedup_vs_exact"] = ref["median_s"] / last["median_s"]
        for k in ("rel_bias", "rel_bias_se", "rel_std", "rel_rmse"):
            if k in last:
                row[k] = last[k]
        out.append(row)
    return out


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
    rows += summarize(rows)
    if not impls or any(i in RESIDUAL_IMPLS for i in impls):
        rows += run_residual(device, sizes, repeats, quick, impls, dtype)
    return rows


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


def plot_residual(rows, path):
    """Time (left, with fitted slopes) and relative RMSE (right) of the residual / trace routes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slopes = {r["impl"]: r["slope"] for r in rows if r.get("mode") == "residual_slope"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for name, marker in zip(RESIDUAL_IMPLS, "osD^v"):
        pts = sorted((r["n"], r["median_s"], r.get("rel_rmse")) for r in rows
                     if r.get("impl") == name and r.get("mode") == RESIDUAL_MODE and r.get("median_s"))
        if not pts:
            continue
        ns, ts, errs = zip(*pts)
        label = f"{name} (slope {slopes[name]:.2f} for D>={FIT_FROM})" if name in slopes else name
        ax.loglog(ns, ts, marker=marker, label=label)
        if errs[0] is not None:
            ax2.loglog(ns, errs, marker=marker, label=name)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("D")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("median time per evaluation [s]")
    ax.set_title("log|det(I + J_g)| and tr(J_g) of one residual block, one sample")
    ax2.set_ylabel(f"relative RMSE vs the exact value ({ERROR_DRAWS} draws)")
    ax2.set_title("error of the estimators")
    return save_figure(fig, path, dpi=120)


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the plots, next to it."""
    out = [plot(rows, Path(json_path).with_suffix(".png"))]
    if any(r.get("mode") == RESIDUAL_MODE for r in rows):
        p = Path(json_path)
        out.append(plot_residual(rows, p.with_name(p.stem + "_residual.png")))
    return out
