"""Coupling suite: affine coupling (exp and softclamp scales), additive coupling and NICE's
rescale, every available fastflow backend against plain PyTorch eager of the same math and
``torch.compile`` of that math: forward, inverse and forward+backward, ``(B, D)`` float32 with
the shift and raw scale read as interleaved columns of one conditioner output, as a coupling
layer slices them."""

from __future__ import annotations

import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, resolve_backend
from fastflow.bench import paired_ratio, time_interleaved
from fastflow.ops import additive_coupling, affine_coupling, rescale

SUITE = "coupling"
D = 64
DEFAULT_SIZES = (2**12, 2**16)  # batch sizes B, at D = 64 features
QUICK_SIZES = (2**10, 2**14)
TABLE_COLUMNS = ["op", "impl", "mode", "n", "d", "median_s", "ns_per_element", "speedup_vs_eager",
                 "paired_vs_eager", "speedup_vs_compile", "paired_vs_compile"]


# -------------------------------------------------------------- the same math in plain torch


def _log_scale(h, scale, clamp=2.0):
    if scale == "softclamp":
        return clamp * torch.tanh(h / clamp)
    return h


def eager_affine(x, t, h, inverse, scale="exp"):
    logs = _log_scale(h, scale)
    lad = logs.sum(1)
    if inverse:
        return (x - t) * torch.exp(-logs), -lad
    return x * torch.exp(logs) + t, lad


def eager_additive(x, t, inverse):
    return (x - t) if inverse else (x + t), x.new_zeros(x.shape[0])


def eager_rescale(x, ls, inverse):
    lad = ls.sum().expand(x.shape[0])
    return (x * torch.exp(-ls), -lad) if inverse else (x * torch.exp(ls), lad)


_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# -------------------------------------------------------------- cases


def cases(device="cpu", dtype=torch.float32):
    """``{op: (make_inputs(n, seed) -> tensors, {impl: fn(*tensors, inverse) -> (y, lad)})}``."""
    def affine_inputs(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, D, generator=g).to(device=device, dtype=dtype)
        h = (torch.randn(n, 2 * D, generator=g) * 0.5).to(device=device, dtype=dtype)
        return [x, h[:, ::2], h[:, 1::2]]  # the conditioner's interleaved shift / raw scale

    def rescale_inputs(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(n, D, generator=g).to(device=device, dtype=dtype),
                (torch.randn(D, generator=g) * 0.5).to(device=device, dtype=dtype)]

    probe = torch.empty(1, device=device, dtype=dtype)
    out = {}
    specs = {
        "affine_coupling": (affine_inputs, lambda x, t, h, inv, **kw: affine_coupling(x, t, h, inverse=inv, **kw),
                            lambda x, t, h, inv: eager_affine(x, t, h, inv)),
        "affine_coupling_softclamp": (
            affine_inputs,
            lambda x, t, h, inv, **kw: affine_coupling(x, t, h, scale="softclamp", inverse=inv, **kw),
            lambda x, t, h, inv: eager_affine(x, t, h, inv, "softclamp")),
        "additive_coupling": (lambda n, seed=0: affine_inputs(n, seed)[:2],
                              lambda x, t, inv, **kw: additive_coupling(x, t, inverse=inv, **kw), eager_additive),
        "rescale": (rescale_inputs, lambda x, ls, inv, **kw: rescale(x, ls, inverse=inv, **kw), eager_rescale),
    }
    for op, (make, ours, eager) in specs.items():
        impls = {}
        for name in BACKENDS:
            try:
                resolve_backend(op.replace("_softclamp", ""), probe, name)
            except BackendUnavailableError:
                continue
            impls[name] = lambda *a, ours=ours, name=name: ours(*a, backend=name)
        impls["eager"] = eager
        impls["compile"] = lambda *a, eager=eager: _compiled(eager)(*a)
        out[op] = (make, impls)
    return out


def case_call(fn, tensors, mode):
    """The timed call of one case: ``fn(*tensors, inverse)`` under no_grad for ``"forward"`` and
    ``"inverse"``; for ``"forward+backward"``, the forward on leaves of its own (fresh copies),
    ``(y.sum() + lad.sum()).backward()``, and the gradients cleared for the next call."""
    if mode == "forward+backward":
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]

        def call():
            y, lad = fn(*leaves, False)
            (y.sum() + lad.sum()).backward()
            for t in leaves:
                t.grad = None
    else:
        def call():
            with torch.no_grad():
                return fn(*tensors, mode == "inverse")
    return call


def run(device="cpu", sizes=None, dtype=torch.float32, repeats=7, quick=False, impls=None, modes=None, ops=None):
    """One row per (op, size, mode, implementation). The implementations of one (op, size, mode)
    are timed in alternation (``time_interleaved``), so ``speedup_vs_eager``/``_compile``
    (ratios of medians) and ``paired_vs_eager``/``_compile`` (medians of the per-round
    ratios) compare times taken side by side."""
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    modes = modes or ("forward", "inverse", "forward+backward")
    rows = []
    for op, (make, available) in cases(device, dtype).items():
        if ops and op not in ops:
            continue
        if impls:
            available = {n: f for n, f in available.items() if n in impls}
        for n in sizes:
            tensors = make(n)
            for mode in modes:
                calls = {name: case_call(fn, tensors, mode) for name, fn in available.items()}
                stats = time_interleaved(calls, device, repeats=repeats, warmup=2)
                base = {"op": op, "mode": mode, "n": n, "d": D, "dtype": str(dtype).replace("torch.", "")}
                for name, st in stats.items():
                    row = {**base, "impl": name, **st}
                    if "median_s" in st:
                        row["ns_per_element"] = st["median_s"] / (n * D) * 1e9
                        for b in ("eager", "compile"):
                            if "times" in stats.get(b, {}):
                                row[f"speedup_vs_{b}"] = stats[b]["median_s"] / st["median_s"]
                                row[f"paired_vs_{b}"] = paired_ratio(stats[b]["times"], st["times"])
                    rows.append(row)
    return rows


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the speed-up chart, next to it."""
    from pathlib import Path

    from fastflow.bench import plot_speedups

    return [plot_speedups(rows, Path(json_path).with_suffix(".png"), "eager",
                          "Coupling laws: fastflow backends and torch.compile against PyTorch eager")]


if __name__ == "__main__":  # python -m fastflow.bench.coupling [B ...]
    import sys

    from fastflow.bench import format_table
    from fastflow.bench.sizes import parse_size

    sizes = tuple(parse_size(a) for a in sys.argv[1:]) or None
    print(format_table([r for r in run(sizes=sizes) if "error" not in r], TABLE_COLUMNS))
