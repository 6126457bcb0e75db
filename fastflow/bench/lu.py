"""LU suite: ``lu_linear``, ``lu_conv1x1`` and the fused ``actnorm_conv1x1`` on every available
fastflow backend against plain PyTorch doing the same math the usual way (dense ``W = P L M``
built per call, matmul, ``slogdet(W)`` for the log-det, ``torch.inverse(W)`` for the inverse,
ActNorm as its own pass) in eager mode and under ``torch.compile``: forward, inverse and
forward+backward, float32."""

from __future__ import annotations

import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, resolve_backend
from fastflow.bench import time_interleaved
from fastflow.ops import actnorm_conv1x1, lu_conv1x1, lu_linear

SUITE = "lu"
DEFAULT_SIZES = (2**18, 2**22)
QUICK_SIZES = (2**14,)
# op -> (C, H, W); the batch is sizes[i] // (C*H*W). Glow's mid-level shapes; a flow on tabular data.
CASES = {"lu_linear": (64, 1, 1), "lu_conv1x1": (48, 16, 16), "actnorm_conv1x1": (48, 16, 16)}
TABLE_COLUMNS = ["op", "impl", "mode", "n", "c", "median_s", "ns_per_element", "speedup_vs_torch_eager",
                 "speedup_vs_reference"]


def make_case(op, n, device="cpu", dtype=torch.float32, seed=0):
    """Inputs and parameters of ``op`` with about ``n`` elements (shared with benchmarks/bench_lu.py)."""
    c, h, w = CASES[op]
    b = max(1, n // (c * h * w))
    g = torch.Generator().manual_seed(seed)
    shape = (b, c) if op == "lu_linear" else (b, c, h, w)
    t = {
        "x": torch.randn(shape, generator=g),
        "an_bias": torch.randn(c, generator=g) * 0.1,
        "an_logscale": torch.randn(c, generator=g) * 0.1,
        "lower": torch.randn(c, c, generator=g) * 0.1,
        "upper": torch.randn(c, c, generator=g) * 0.1,
        "log_s": torch.randn(c, generator=g) * 0.1,
        "sign": torch.where(torch.rand(c, generator=g) > 0.5, 1.0, -1.0),
    }
    t = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    t["perm"] = torch.randperm(c, generator=g).to(device)
    return t


PARAMS = ("an_bias", "an_logscale", "lower", "upper", "log_s")


def fastflow_fn(op, backend):
    def fn(t, inverse):
        lu = (t["perm"], t["lower"], t["upper"], t["log_s"], t["sign"])
        if op == "lu_linear":
            return lu_linear(t["x"], *lu, inverse=inverse, backend=backend)
        if op == "lu_conv1x1":
            return lu_conv1x1(t["x"], *lu, inverse=inverse, backend=backend)
        return actnorm_conv1x1(t["x"], t["an_bias"], t["an_logscale"], *lu, inverse=inverse, backend=backend)

    return fn


def torch_dense(op):
    """The textbook implementation: dense W each call, matmul, slogdet, general inverse."""

    def fn(t, inverse):
        c = t["lower"].shape[0]
        eye = torch.eye(c, dtype=t["lower"].dtype, device=t["lower"].device)
        w = eye[t["perm"]] @ (torch.tril(t["lower"], -1) + eye) @ (
            torch.triu(t["upper"], 1) + torch.diag(t["sign"] * torch.exp(t["log_s"])))
        x = t["x"]
        n = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
        lad = torch.linalg.slogdet(w)[1] * n
        an = op == "actnorm_conv1x1"
        if an:
            lad = lad + n * t["an_logscale"].sum()
        if not inverse:
            if an:
                x = torch.exp(t["an_logscale"])[:, None, None] * (x + t["an_bias"][:, None, None])
            y = x @ w.T if x.dim() == 2 else torch.nn.functional.conv2d(x, w[:, :, None, None])
        else:
            v = torch.inverse(w)
            y = x @ v.T if x.dim() == 2 else torch.nn.functional.conv2d(x, v[:, :, None, None])
            if an:
                y = y * torch.exp(-t["an_logscale"])[:, None, None] - t["an_bias"][:, None, None]
            lad = -lad
        return y, lad.expand(x.shape[0])

    return fn


def impls(op, device, dtype=torch.float32):
    out = {}
    probe = torch.empty(1, device=device, dtype=dtype)
    for name in BACKENDS:
        try:
            resolve_backend(op, probe, name)
        except BackendUnavailableError:
            continue
        out[name] = fastflow_fn(op, name)
    out["torch_eager"] = torch_dense(op)
    out["torch_compile"] = torch.compile(torch_dense(op), dynamic=False)
    return out


def run(device="cpu", sizes=None, repeats=5, quick=False, ops=None, modes=None, dtype=torch.float32, impls_only=None):
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    modes = modes or ("forward", "inverse", "forward+backward")
    rows = []
    for op in ops or CASES:
        for n in sizes:
            t = make_case(op, n, device, dtype)
            numel = t["x"].numel()
            available = {n: f for n, f in impls(op, device, dtype).items() if not impls_only or n in impls_only}
            for mode in modes:
                calls = {}
                for name, fn in available.items():
                    if mode == "forward+backward":
                        leaves = {k: (v.detach().clone().requires_grad_(k == "x" or k in PARAMS)
                                      if v.is_floating_point() else v) for k, v in t.items()}

                        def call(fn=fn, leaves=leaves):
                            y, lad = fn(leaves, False)
                            (y.sum() + lad.sum()).backward()
                            for v in leaves.values():
                                v.grad = None
                    else:
                        def call(fn=fn, inverse=mode == "inverse"):
                            with torch.no_grad():
                                return fn(t, inverse)
                    calls[name] = call
                row = {"op": op, "mode": mode, "n": numel, "c": t["lower"].shape[0], "shape": list(t["x"].shape),
                       "dtype": str(dtype).replace("torch.", "")}
                # In alternation (e.g. torch.compile without a C++ compiler fails: its row says so).
                for name, stats in time_interleaved(calls, device, repeats=repeats, warmup=2).items():
                    if "error" in stats:
                        stats = {"error": stats["error"][:300]}
                    r = {**row, "impl": name, **stats}
                    if "median_s" in stats:
                        r["ns_per_element"] = stats["median_s"] / numel * 1e9
                    rows.append(r)
    return add_ratios(rows)


def add_ratios(rows):
    from fastflow.bench import add_ratios as _add

    return _add(rows, baselines=("torch_eager", "torch_compile", "reference"))


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the speed-up chart, next to it."""
    from pathlib import Path

    from fastflow.bench import plot_speedups

    return [plot_speedups(rows, Path(json_path).with_suffix(".png"), "torch_eager",
                          "LU 1x1 convolution / linear: fastflow backends and torch.compile against PyTorch eager")]
