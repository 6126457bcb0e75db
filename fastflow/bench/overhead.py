"""``fastflow bench overhead``: the fixed per-call cost of every public op, eager, CPU, float32.

For each op declared in ``fastflow/ops/_samples.py`` (every public op and spline parameterisation),
``backend=None`` (what a model gets), its forward and its forward+backward (gradients of
``outputs.sum() + logabsdet.sum()`` w.r.t. every input that takes one, ``torch.autograd.grad``)
are timed at ``SIZES`` (2^8 .. 2^12 elements of the first input, where flows are trained: a few
thousand elements per call). The sizes of one op and mode are timed in alternation
(``time_interleaved``: drift hits every size alike). A least-squares line through the medians,
``t(n) = fixed + per_element * n``, gives the op's **fixed cost** (the intercept: checks,
dispatch, backend resolution, allocation, launches) and its per-element cost at these sizes;
both are in a summary row per op and mode (``mode``: ``forward fixed`` / ``forward+backward
fixed``), with the fit's largest relative residual.

A baseline row, ``torch exp (baseline)``, times one plain torch elementwise op (``x.exp()``,
``x * 0``) through the same harness: what any op pays for the call, the two sums, the autograd
graph and ``torch.autograd.grad`` at these sizes. ``over_baseline_us`` is an op's fixed cost
minus the baseline's.

Inputs come from each op's own ``example`` builder (the conformance suite's valid inputs), its
first variant, with the first input's leading dimension scaled to the size.
"""

from __future__ import annotations

import math

import torch

from fastflow.bench import time_interleaved

SUITE = "overhead"
SIZES = (256, 512, 1024, 2048, 4096)
TABLE_COLUMNS = ["op", "mode", "n", "median_s", "fixed_cost_us", "over_baseline_us", "per_element_ns",
                 "max_rel_residual"]


def _inputs(spec, n: int, seed: int = 0):
    """The op's example inputs with about ``n`` elements in the first input."""
    typical = spec.shapes[0]
    row = math.prod(typical[1:]) if len(typical) > 1 else 1
    shape = (max(1, n // row), *typical[1:])
    g = torch.Generator().manual_seed(seed)
    tensors, kwargs = spec.example(shape, torch.float32, "cpu", g, **spec.options[0])
    return list(tensors), kwargs


def _calls(spec, sizes):
    fwd, fb = {}, {}
    for n in sizes:
        tensors, kwargs = _inputs(spec, n)
        plain = [t.detach() for t in tensors]
        wants = [spec.inputs[i] in spec.grad_inputs for i in range(len(tensors))]
        leaves = [t.detach().requires_grad_(w) for t, w in zip(tensors, wants)]
        grads_of = [t for t, w in zip(leaves, wants) if w]

        def forward(plain=plain, kwargs=kwargs):
            with torch.no_grad():
                return spec.fn(*plain, **kwargs)

        def forward_backward(leaves=leaves, grads_of=grads_of, kwargs=kwargs):
            out, lad = spec.fn(*leaves, **kwargs)
            return torch.autograd.grad(out.sum() + lad.sum(), grads_of)

        elements = plain[0].numel()
        fwd[elements], fb[elements] = forward, forward_backward
    return {"forward": fwd, "forward+backward": fb}


def fit_line(ns, ts) -> tuple[float, float, float]:
    """Least squares ``t = a + b n``; returns ``(a, b, largest |residual| / t)``."""
    k = len(ns)
    mn, mt = sum(ns) / k, sum(ts) / k
    sxx = sum((x - mn) ** 2 for x in ns)
    b = sum((x - mn) * (y - mt) for x, y in zip(ns, ts)) / sxx if sxx else 0.0
    a = mt - b * mn
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(ns, ts)) if ts else 0.0
    return a, b, worst


class _Baseline:
    """A stand-in spec: one plain torch elementwise op, timed through the same harness."""

    inputs = grad_inputs = ("x",)
    shapes = ((64, 16),)
    options = ({},)

    @staticmethod
    def example(shape, dtype, device, generator):
        return [torch.randn(*shape, dtype=dtype, generator=generator).to(device)], {}

    @staticmethod
    def fn(x):
        return x.exp(), x * 0


BASELINE = "torch exp (baseline)"


def run(device="cpu", sizes=None, repeats=5, quick=False, ops=None, **_):
    """Rows per (op, mode, size) and a fixed-cost row per (op, mode)."""
    if torch.device(device).type != "cpu":
        raise ValueError("fastflow bench overhead: CPU only (the eager per-call cost)")
    from fastflow.ops._samples import SPECS

    sizes = tuple(sizes or ((256, 1024) if quick else SIZES))
    rounds = 3 if quick else max(int(repeats or 5), 15)
    rows = []
    base_fixed = {}
    for name, spec in [(BASELINE, _Baseline), *SPECS.items()]:
        if ops and name not in ops and name != BASELINE:
            continue
        impl = "torch" if name == BASELINE else "fastflow (backend=None)"
        for mode, calls in _calls(spec, sizes).items():
            stats = time_interleaved({str(n): fn for n, fn in calls.items()}, "cpu", repeats=rounds, warmup=3)
            ns, ts = [], []
            for n in calls:
                st = stats[str(n)]
                row = {"op": name, "mode": mode, "impl": impl, "n": n, "dtype": "float32"}
                if "error" in st:
                    rows.append({**row, "error": st["error"]})
                    continue
                rows.append({**row, **{k: v for k, v in st.items() if k != "repeats"}, "rounds": st["repeats"]})
                ns.append(n)
                ts.append(st["median_s"])
            if len(ns) >= 2:
                a, b, worst = fit_line(ns, ts)
                if name == BASELINE:
                    base_fixed[mode] = a
                rows.append({"op": name, "mode": f"{mode} fixed", "impl": impl,
                             "n": f"{min(ns)}..{max(ns)}", "fixed_cost_s": a, "fixed_cost_us": 1e6 * a,
                             "per_element_ns": 1e9 * b, "max_rel_residual": worst, "sizes": ns,
                             "over_baseline_us": 1e6 * (a - base_fixed[mode]) if mode in base_fixed else None})
    return rows
