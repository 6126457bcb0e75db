"""``fastflow bench models``: whole models, fastflow's own against the same architecture in zuko
and nflows, each eager and under ``torch.compile``.

Models (same structure in every library, as far as the libraries allow; parameter counts are in
the rows and equal across libraries):

- ``nsf-coupling``: rational-quadratic spline couplings (K bins, linear tails at +-5) on
  alternating even/odd masks, an MLP conditioner (two hidden layers) of the untouched half.
  fastflow ``build("nsf", conditioner="mlp", permutation="none")``; zuko ``NICE`` with zuko's
  ``MonotonicRQSTransform`` as the univariate map (its ``GeneralCouplingTransform``); nflows
  ``PiecewiseRationalQuadraticCouplingTransform`` with the same MLP.
- ``nsf-ar``: masked autoregressive splines, a MADE with two hidden layers, the order reversed
  between layers. fastflow ``build("nsf-ar")``; zuko ``NSF``; nflows
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` (no residual blocks) and
  ``ReversePermutation``.
- ``maf``: masked affine autoregressive layers, as above. fastflow ``build("maf")`` (soft-clamped
  scale); zuko ``MAF`` (its soft-clamped scale); nflows ``MaskedAffineAutoregressiveTransform``
  (softplus scale). Each library's own scale function: the same cost class, not the same maths.
- ``realnvp``: affine couplings on alternating masks, the same MLP conditioner. fastflow
  ``build("realnvp", conditioner="mlp")``; zuko ``RealNVP``; nflows ``AffineCouplingTransform``
  (sigmoid scale).

Sizes (``SIZES``): ``sbi`` (8 features, 5 transforms, hidden (64, 64), 8 bins, batch 512) and
``hpc`` (32 features, 10 transforms, hidden (256, 256), 8 bins, batch 8192); ``tiny`` for
``--quick``. float32, CPU, one process.

Cases, each one timed call:

- ``train_step``: ``zero_grad``, the batch's mean negative log-likelihood, ``backward`` and an Adam
  step (lr 1e-3, torch's default Adam), on a fixed batch;
- ``sample``: ``sample(batch)`` under ``no_grad``.

Implementations per model and case: ``fastflow``, ``fastflow + compile``, ``zuko``,
``zuko + compile``, ``nflows``, ``nflows + compile`` and ``floor``. A compiled row runs the
library's model through ``torch.compile`` (default inductor backend, not fullgraph, static
shapes): the loss function (its forward and, through AOTAutograd, its backward; the optimizer
step stays eager, the same Adam for every row) or the sampling function. fastflow's compiled row
uses ``fastflow.compile`` (recorded in ``compiled_with``). The graphs and
graph breaks of every compiled function are counted once, untimed, with ``torch._dynamo.explain``.
``floor`` is the fastflow model (eager) with its elementwise law replaced by a no-op (values
through, zero log-det, the gradient still reaching the conditioner through a zero): what the
conditioners, the permutations, the base density and the optimizer cost. No work on the law can
make the model faster than its floor.

Timing: every implementation has its own model and optimizer, built from the same seed. Each is
warmed up untimed (``WARMUP`` calls, so compilation happens there), then ``rounds`` rounds each
time every implementation once, the order rotating from round to round (``time_interleaved``).
Rows carry the median, min, max and per-round times, and the speed-up over ``zuko + compile``
as the median of the per-round ratios (``paired_speedup_vs_zuko_compile``) and as the ratio of
medians. Before timing, each model's loss on the batch is computed eager and compiled on the same
weights (``loss``, ``compiled_loss_rel_diff``): the compiled function is the eager one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastflow.bench import format_table, paired_ratio, source, time_interleaved

SUITE = "models"
SIZES = {
    "sbi": {"features": 8, "transforms": 5, "hidden": 64, "bins": 8, "batch": 512, "rounds": 15},
    "hpc": {"features": 32, "transforms": 10, "hidden": 256, "bins": 8, "batch": 8192, "rounds": 7},
    "tiny": {"features": 4, "transforms": 2, "hidden": 16, "bins": 4, "batch": 64, "rounds": 2},
}
DEFAULT_SIZES = ("sbi", "hpc")
MODELS = ("nsf-coupling", "nsf-ar", "maf", "realnvp")
CASES = ("train_step", "sample")
LIBRARIES = ("fastflow", "zuko", "nflows")
FLOOR = "floor"
IMPLS = ("fastflow", "fastflow + compile", "zuko", "zuko + compile", "nflows", "nflows + compile", FLOOR)
BASELINE = "zuko + compile"
TAIL_BOUND, LR, WARMUP = 5.0, 1e-3, 2
TIMED = {
    "train_step": "zero_grad + mean NLL of the batch + backward + Adam step (lr 1e-3)",
    "sample": "sample(batch) under no_grad",
}


@dataclass
class Impl:
    """One library's model: its module, ``loss(x)`` (mean NLL) and ``sample(n)``."""

    module: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int], torch.Tensor]
    note: str = ""


# ----------------------------------------------------------------------------- the three libraries
def _fastflow(model: str, cfg: dict) -> Impl:
    from fastflow.flows import build

    d, t, h, k = cfg["features"], cfg["transforms"], cfg["hidden"], cfg["bins"]
    common = {"num_layers": t, "hidden_features": h, "num_blocks": 2}
    if model == "nsf-coupling":
        flow = build("nsf", (d,), conditioner="mlp", permutation="none", num_bins=k, tail_bound=TAIL_BOUND, **common)
    elif model == "nsf-ar":
        flow = build("nsf-ar", (d,), permutation="reverse", num_bins=k, tail_bound=TAIL_BOUND, **common)
    elif model == "maf":
        flow = build("maf", (d,), permutation="reverse", **common)
    elif model == "realnvp":
        flow = build("realnvp", (d,), conditioner="mlp", permutation="none", **common)
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return Impl(flow, lambda x: -flow.log_prob(x).mean(), lambda n: flow.sample(n),
                f"fastflow.flows.build({flow.spec})")


def _zuko(model: str, cfg: dict) -> Impl:
    from functools import partial

    import zuko
    from zuko.transforms import MonotonicRQSTransform

    d, t, h, k = cfg["features"], cfg["transforms"], cfg["hidden"], cfg["bins"]
    hidden = (h, h)
    if model == "nsf-coupling":
        flow = zuko.flows.NICE(d, transforms=t, hidden_features=hidden, shapes=[(k,), (k,), (k - 1,)],
                               univariate=partial(MonotonicRQSTransform, bound=TAIL_BOUND))
        note = ("zuko.flows.NICE(univariate=MonotonicRQSTransform, shapes=[(K,), (K,), (K-1,)]): "
                "GeneralCouplingTransform")
    elif model == "nsf-ar":
        flow = zuko.flows.NSF(d, transforms=t, hidden_features=hidden, bins=k)
        note = "zuko.flows.NSF (fully autoregressive, order reversed every other transform)"
    elif model == "maf":
        flow = zuko.flows.MAF(d, transforms=t, hidden_features=hidden)
        note = "zuko.flows.MAF"
    elif model == "realnvp":
        flow = zuko.flows.RealNVP(d, transforms=t, hidden_features=hidden)
        note = "zuko.flows.RealNVP"
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return Impl(flow, lambda x: -flow().log_prob(x).mean(), lambda n: flow().sample((n,)), note)


class _MLP(nn.Module):
    """The coupling conditioner for nflows: the same MLP as fastflow's and zuko's (nflows' couplings
    call ``net(x, context)``, which its own ``nets.MLP`` does not take)."""

    def __init__(self, in_features, out_features, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_features))

    def forward(self, x, context=None):
        return self.net(x)


def _nflows(model: str, cfg: dict) -> Impl:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import autoregressive as ar
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.permutations import ReversePermutation

    d, t, h, k = cfg["features"], cfg["transforms"], cfg["hidden"], cfg["bins"]
    net = lambda i, o: _MLP(i, o, h)  # noqa: E731
    made = {"num_blocks": 1, "use_residual_blocks": False}  # input layer + 1 block = two hidden layers
    layers = []
    for i in range(t):
        mask = torch.arange(d) % 2 == i % 2
        if model == "nsf-coupling":
            layers.append(PiecewiseRationalQuadraticCouplingTransform(mask, net, num_bins=k, tails="linear",
                                                                      tail_bound=TAIL_BOUND))
        elif model == "realnvp":
            layers.append(AffineCouplingTransform(mask, net))
        elif model == "nsf-ar":
            if i:
                layers.append(ReversePermutation(d))
            layers.append(ar.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                d, h, num_bins=k, tails="linear", tail_bound=TAIL_BOUND, **made))
        elif model == "maf":
            if i:
                layers.append(ReversePermutation(d))
            layers.append(ar.MaskedAffineAutoregressiveTransform(d, h, **made))
        else:
            raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    flow = Flow(CompositeTransform(layers), StandardNormal([d]))
    note = {"nsf-coupling": "PiecewiseRationalQuadraticCouplingTransform + MLP", "realnvp":
            "AffineCouplingTransform + MLP", "nsf-ar": "MaskedPiecewiseRationalQuadraticAutoregressiveTransform "
            "(MADE, no residual blocks) + ReversePermutation", "maf": "MaskedAffineAutoregressiveTransform (MADE, "
            "no residual blocks) + ReversePermutation"}[model]
    return Impl(flow, lambda x: -flow.log_prob(x).mean(), lambda n: flow.sample(n), note)


BUILDERS = {"fastflow": _fastflow, "zuko": _zuko, "nflows": _nflows}


class NoOpLaw:
    """The floor's law: values through unchanged, zero log-det; the parameters enter as ``0 * sum``
    so the backward still runs through the conditioner (as the real law's does)."""

    def __init__(self, params_per_element: int):
        self.params_per_element = params_per_element

    def bind(self, hidden_features):
        pass

    def __call__(self, x, params, inverse):
        z = params.sum(-1) * 0
        return x + z, z.flatten(1).sum(1)


def floor_of(flow: nn.Module) -> nn.Module:
    """A copy of a fastflow flow with every layer's law replaced by :class:`NoOpLaw`."""
    out = copy.deepcopy(flow)
    n = 0
    for m in out.modules():
        law = getattr(m, "law", None)
        if law is not None and hasattr(law, "params_per_element"):
            m.law = NoOpLaw(law.params_per_element)
            n += 1
    if not n:
        raise ValueError("floor_of: the flow has no layer with a law")
    return out


def _floor(model: str, cfg: dict, flow: nn.Module) -> Impl:
    f = floor_of(flow)
    return Impl(f, lambda x: -f.log_prob(x).mean(), lambda n: f.sample(n), "the fastflow model, laws a no-op, eager")


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- compiling and timing
def _compile(lib: str, fn: Callable, module: nn.Module, case: str) -> tuple[Callable, str]:
    """``torch.compile`` of one function; for fastflow its documented path, ``fastflow.compile``
    (the model's loss with its backward, or its sampler: the noise drawn eagerly, the push compiled)."""
    import fastflow

    if lib == "fastflow":
        fast = fastflow.compile(module)
        if case == "train_step":
            return fast.loss, "fastflow.compile(flow).loss (inductor, fullgraph)"
        return fast.sample, "fastflow.compile(flow).sample (inductor, fullgraph)"
    return torch.compile(fn), "torch.compile (inductor, not fullgraph)"


def _explain(fn: Callable, *args) -> dict:
    """Graphs and graph breaks dynamo makes of ``fn(*args)`` (untimed; traces, compiles nothing)."""
    import torch._dynamo

    try:
        torch._dynamo.reset()
        e = torch._dynamo.explain(fn)(*args)
        reasons = []
        for r in e.break_reasons:
            text = str(getattr(r, "reason", r)).strip().splitlines()[0][:160]
            if text not in reasons:
                reasons.append(text)
        return {"graphs": e.graph_count, "graph_breaks": e.graph_break_count, "break_reasons": reasons[:5]}
    except Exception as exc:  # an explain failure is a result, not a lost run
        return {"explain_error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch._dynamo.reset()


def _step_fn(module: nn.Module, loss: Callable, x: torch.Tensor):
    opt = torch.optim.Adam(module.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(x).backward()
        opt.step()

    return step


def _draw_fn(sample: Callable, n: int):
    def draw():
        with torch.no_grad():
            return sample(n)

    return draw


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _group(size: str, cfg: dict, model: str, rounds: int, warmup: int, explain: bool) -> list[dict]:
    """Build every implementation of one model at one size, check them, time both cases."""
    import torch._dynamo

    torch._dynamo.reset()  # fresh compile caches per group: no recompile limit reached, no stale guards
    batch = cfg["batch"]
    x = torch.randn(batch, cfg["features"], generator=torch.Generator().manual_seed(0))
    impls: dict[str, tuple[Impl, str]] = {}  # name -> (impl, library)
    errors: dict[str, str] = {}
    for lib in LIBRARIES:
        try:
            torch.manual_seed(0)
            impl = BUILDERS[lib](model, cfg)
        except Exception as exc:  # a missing peer is a result
            errors[lib] = errors[f"{lib} + compile"] = f"{type(exc).__name__}: {exc}"
            continue
        impls[lib] = (impl, lib)
        # the compiled row gets its own copy of the same initial weights (and its own optimizer)
        impls[f"{lib} + compile"] = (Impl(copy.deepcopy(impl.module), None, None, impl.note), lib)
        if lib == "fastflow":
            impls[FLOOR] = (_floor(model, cfg, impl.module), lib)
    # rebind the copies' loss/sample to the copied modules (the builders' closures hold the originals)
    for name, (impl, lib) in list(impls.items()):
        if impl.loss is None:
            twin = _rebind(lib, impl.module)
            impls[name] = (Impl(impl.module, twin.loss, twin.sample, impl.note), lib)
    meta: dict[str, dict] = {}
    for name, (impl, lib) in impls.items():
        meta[name] = {"library": lib, "compiled": name.endswith("+ compile"), "params": _n_params(impl.module),
                      "built_as": impl.note}
    rows = []
    for case in CASES:
        calls, info = {}, {}
        for name, (impl, lib) in impls.items():
            fn = impl.loss if case == "train_step" else impl.sample
            arg = x if case == "train_step" else batch
            extra = {}
            if meta[name]["compiled"]:
                if explain:
                    extra.update(_explain_case(fn, case, arg))
                fn, how = _compile(lib, fn, impl.module, case)
                extra["compiled_with"] = how
            try:
                extra.update(_check(name, case, impl, fn, arg, x))
            except Exception as exc:
                errors[f"{name}/{case}"] = f"{type(exc).__name__}: {exc}"
                continue
            calls[name] = _step_fn(impl.module, fn, x) if case == "train_step" else _draw_fn(fn, batch)
            info[name] = extra
        stats = time_interleaved(calls, "cpu", repeats=rounds, warmup=warmup)
        base = stats.get(BASELINE, {})
        for name in IMPLS:
            row = {"op": model, "mode": case, "n": batch, "impl": name, "size": size, "model": model, "case": case,
                   "batch": batch, "features": cfg["features"], "transforms": cfg["transforms"],
                   "hidden": [cfg["hidden"]] * 2, "bins": cfg["bins"], "tail_bound": TAIL_BOUND, "dtype": "float32",
                   "timed": TIMED[case], **meta.get(name, {}), **info.get(name, {})}
            err = errors.get(f"{name}/{case}") or errors.get(name)
            st = stats.get(name)
            if err or st is None:
                row["error"] = err or "not run"
            elif "error" in st:
                row["error"] = st["error"]
            else:
                row.update({k: v for k, v in st.items() if k != "repeats"}, rounds=st["repeats"])
                if base.get("median_s"):
                    row["speedup_vs_zuko_compile"] = base["median_s"] / st["median_s"]
                    row["paired_speedup_vs_zuko_compile"] = paired_ratio(base["times"], st["times"])
            rows.append(row)
    return rows


def _rebind(lib: str, module: nn.Module) -> Impl:
    if lib == "zuko":
        return Impl(module, lambda x: -module().log_prob(x).mean(), lambda n: module().sample((n,)))
    return Impl(module, lambda x: -module.log_prob(x).mean(), lambda n: module.sample(n))


def _explain_case(fn, case, arg) -> dict:
    if case == "train_step":
        return _explain(fn, arg)
    with torch.no_grad():
        return _explain(fn, arg)


def _check(name: str, case: str, impl: Impl, fn: Callable, arg, x) -> dict:
    """Untimed: what the timed function computes on the initial weights. Train step: the loss
    (finite), and for a compiled row its relative difference to the eager loss on the same weights
    (the compile warm-up happens here). Sample: the samples are finite."""
    out = {}
    if case == "train_step":
        eager = float(impl.loss(x).detach())
        got = float(fn(x).detach())
        out["loss"] = got
        out["loss_finite"] = math.isfinite(got)
        if name.endswith("+ compile"):
            out["compiled_loss_rel_diff"] = _rel(got, eager)
        if name == FLOOR:  # identity laws: the density is the base density of permuted x
            base = float(-torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1).mean())
            out["floor_loss_rel_diff_vs_base_nll"] = _rel(got, base)
    else:
        with torch.no_grad():
            s = fn(8 if not name.endswith("+ compile") else arg)
        out["samples_finite"] = bool(torch.isfinite(s).all())
    return out


# ----------------------------------------------------------------------------- the suite
def _load() -> dict:
    try:
        with open("/proc/loadavg") as f:
            one, five, fifteen = (float(v) for v in f.read().split()[:3])
        return {"load_1min": one, "load_5min": five, "load_15min": fifteen}
    except (OSError, ValueError):
        return {}


def parse_size_names(text: str) -> list[str]:
    """``"sbi,hpc"`` -> ``["sbi", "hpc"]``; an unknown name is a ValueError naming the known ones."""
    names = [t.strip() for t in str(text).split(",")]
    bad = [n for n in names if n not in SIZES]
    if bad or not names:
        raise ValueError(f"unknown model size {bad[0] if bad else text!r}; expected names from {sorted(SIZES)}")
    return names


def run(device="cpu", sizes=None, repeats=None, quick=False, rounds=None, models=None, explain=True, **_):
    """Rows for every (size, model, case, implementation); ``rounds`` (or ``repeats``) overrides each
    size's default number of rounds; ``quick``: the tiny size, 2 rounds, 1 warm-up call."""
    if torch.device(device).type != "cpu":
        raise ValueError("fastflow bench models: CPU only (float32, one process)")
    if sizes is not None and any(not isinstance(s, str) for s in sizes):
        raise ValueError("fastflow bench models: --sizes takes size names "
                         f"({', '.join(sorted(SIZES))}), not element counts")
    names = ["tiny"] if quick and not sizes else list(sizes or DEFAULT_SIZES)
    for n in names:
        parse_size_names(n)
    rounds = rounds or repeats
    t_start = time.perf_counter()
    rows = [{"op": "source", "mode": "-", "n": 0, "impl": "-", **source(), "load_before": _load(),
             "sizes": {n: {k: v for k, v in SIZES[n].items() if k != "rounds"} for n in names}}]
    for size in names:
        cfg = SIZES[size]
        r = 2 if quick else int(rounds or cfg["rounds"])
        for model in models or MODELS:
            t0 = time.perf_counter()
            rows += _group(size, cfg, model, r, 1 if quick else WARMUP, explain)
            print(f"models: {size} {model}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows[0].update(load_after=_load(), wall_s=time.perf_counter() - t_start)
    return rows


TABLE_COLUMNS = ["size", "op", "mode", "impl", "params", "median_s", "paired_speedup_vs_zuko_compile", "graphs",
                 "graph_breaks", "loss", "compiled_loss_rel_diff"]


# ----------------------------------------------------------------------------- table and plot
SHORT = {"fastflow": "fastflow", "fastflow + compile": "fastflow+c", "zuko": "zuko", "zuko + compile": "zuko+c",
         "nflows": "nflows", "nflows + compile": "nflows+c", FLOOR: "floor"}


def _ms(v) -> str:
    return "" if v is None else (f"{1e3 * v:.1f} ms" if v < 1 else f"{v:.2f} s")


def markdown(rows: list[dict]) -> str:
    """The headline table: per size, model and case, every implementation's median and the speed-up
    of fastflow (eager, compiled) and of the floor over ``zuko + compile`` (median of per-round ratios)."""
    timed = [r for r in rows if r.get("impl") in IMPLS]
    groups = list(dict.fromkeys((r["size"], r["model"], r["case"]) for r in timed))
    by = {(r["size"], r["model"], r["case"], r["impl"]): r for r in timed}
    head = ["size", "model", "case", *[SHORT[i] for i in IMPLS], "fastflow vs zuko+c", "fastflow+c vs zuko+c",
            "floor vs zuko+c"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [*g]
        for i in IMPLS:
            r = by.get((*g, i), {})
            cells.append(_ms(r.get("median_s")) if r.get("median_s") else "failed" if r.get("error") else "")
        for i in ("fastflow", "fastflow + compile", FLOOR):
            v = by.get((*g, i), {}).get("paired_speedup_vs_zuko_compile")
            cells.append("" if v is None else f"{v:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> Path:
    """Bars: each implementation's speed-up over ``zuko + compile`` (median of per-round ratios), per
    size, model and case; log scale, 1 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastflow.bench import save_figure

    timed = [r for r in rows if r.get("paired_speedup_vs_zuko_compile")]
    groups = list(dict.fromkeys((r["size"], r["model"], r["case"]) for r in timed))
    impls = [i for i in IMPLS if i != BASELINE]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(groups) + 2.0), 4.8))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        pts = [(j, r["paired_speedup_vs_zuko_compile"]) for j, g in enumerate(groups) for r in timed
               if (r["size"], r["model"], r["case"]) == g and r["impl"] == impl]
        if pts:
            xs, ys = zip(*pts)
            ax.bar([v + (k - (len(impls) - 1) / 2) * width for v in xs], ys, width, label=impl,
                   hatch="//" if impl == FLOOR else None, alpha=0.6 if impl == FLOOR else 1.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{m}\n{c}" for s, m, c in groups], fontsize=7)
    ax.set_ylabel("speed-up over zuko + torch.compile\n(median of per-round ratios)")
    ax.set_title("Whole models, float32 CPU: train step (NLL + backward + Adam) and sample(batch)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path, dpi=110)


def after(rows: list[dict], json_path) -> list[Path]:
    """``fastflow bench models`` writes the markdown table and the plot next to the JSON file."""
    json_path = Path(json_path)
    src = next((r for r in rows if r.get("op") == "source"), {})
    md = json_path.with_suffix(".md")
    load = src.get("load_before", {}), src.get("load_after", {})
    text = (f"<!-- from {json_path.name}; load average (1 min) before {load[0].get('load_1min')}, after "
            f"{load[1].get('load_1min')}; wall {src.get('wall_s', 0):.0f} s -->\n\n" + markdown(rows) + "\n")
    md.write_text(text)
    out = [md]
    try:
        out.append(plot(rows, json_path.with_suffix(".png")))
    except ImportError:
        print("models: matplotlib not installed; no plot")
    print("\n" + markdown(rows))
    return out


def summary_table(rows: list[dict]) -> str:
    """A compact text table of the timed rows (for quick looks)."""
    return format_table([r for r in rows if r.get("impl") in IMPLS], TABLE_COLUMNS)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="sbi")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    res = run(sizes=parse_size_names(a.sizes) if not a.quick else None, rounds=a.rounds,
              models=a.models.split(","), quick=a.quick)
    print(summary_table(res))
    print(markdown(res))
