"""MkDocs hook: performance.md, drawn from benchmarks/results/*.json at build time.

For each benchmark suite the newest result file (``<suite>_<device>_<timestamp>.json``) gives a
plot and a table; the training, likelihood and GPU-model files give tables. Nothing on the page
is typed by hand: re-run a benchmark, rebuild the docs, and the page follows. Only the standard
library and matplotlib are used (no fastflow import, so the page does not depend on the kernels).
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BASELINES = {"spline": "nflows", "coupling": "eager", "lu": "torch_eager", "laws": "zuko"}
TITLES = {"spline": "Rational-quadratic spline (`rq_spline`)", "coupling": "Couplings (`affine_coupling`, ...)",
          "lu": "LU linear maps and 1x1 convolutions",
          "laws": "More laws (`bernstein`, `sos_polynomial`, `rq_spline_circular`) against zuko's own transforms"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def _env(payload: dict, name: str) -> str:
    e = payload.get("environment", {})
    v = e.get("versions", {})
    return (f"*From `benchmarks/results/{name}`: {e.get('date', '?')}, {e.get('device', '?')} "
            f"({e.get('device_name', '?')}, {e.get('cpu_count', '?')} CPUs, {e.get('torch_threads', '?')} torch "
            f"threads), torch {v.get('torch', '?')}, numba {v.get('numba', '?')}.*")


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _latest(suite: str) -> tuple[str, dict] | None:
    files = sorted(RESULTS.glob(f"{suite}_*_[0-9]*T[0-9]*.json"))
    if not files:
        return None
    return files[-1].name, json.loads(files[-1].read_text())


def _speedups(suite, name, payload, images) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = BASELINES[suite]
    rows = [r for r in payload["results"] if r.get("median_s") and r.get("impl")]
    size_key = next((k for k in ("k", "d", "c") if any(k in r for r in rows)), None)
    group = lambda r: (r["op"], r["mode"], r["n"], r.get("dtype"), r.get(size_key))  # noqa: E731
    med = {(group(r), r["impl"]): r["median_s"] for r in rows}
    groups = list(dict.fromkeys(group(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    others = [i for i in impls if i != base]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(others))
    for k, impl in enumerate(others):
        pts = [(i, med[(g, base)] / med[(g, impl)]) for i, g in enumerate(groups)
               if (g, base) in med and (g, impl) in med]
        if pts:
            xs, ys = zip(*pts)
            ax.bar([x + (k - (len(others) - 1) / 2) * width for x in xs], ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{op}\n{mode}\nn={n}" for op, mode, n, *_ in groups], fontsize=5.5, rotation=90)
    ax.set_ylabel(f"speed-up over {base} (ratio of medians)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    img = f"img/perf_{suite}.png"
    images[img] = _png(fig)
    header = ["op", "mode", "n", "dtype", *([size_key] if size_key else []), *[f"{i} ms" for i in impls],
              *[f"{i} / {base}" for i in others]]
    table = []
    for g in groups:
        table.append([*(g if size_key else g[:-1]), *[1e3 * med[(g, i)] if (g, i) in med else None for i in impls],
                      *[med[(g, base)] / med[(g, i)] if (g, base) in med and (g, i) in med else None for i in others]])
    return [f"## {TITLES[suite]}", "", _env(payload, name), "", f"![{suite} speed-ups]({img})", "",
            f"Median time per call, and the speed-up of each implementation over `{base}` "
            "(its median divided by theirs, timed in the same run):", "", *_table(header, table)]


def _logdet(name, payload, images) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    out = ["## Log-determinants: cost against dimension", "", _env(payload, name), ""]
    for mode in ("single_sample", "residual_single_sample"):
        sel = [r for r in rows if r.get("mode") == mode and r.get("median_s")]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        by = defaultdict(list)
        for r in sel:
            by[r["impl"]].append((r["n"], r["median_s"]))
        for impl, pts in by.items():
            pts.sort()
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        ax.set_xlabel("dimension D")
        ax.set_ylabel("median seconds per sample")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        img = f"img/perf_logdet_{mode}.png"
        images[img] = _png(fig)
        out += [f"![logdet {mode}]({img})", ""]
    slopes = [r for r in rows if "slope" in str(r.get("mode")) and r.get("slope") is not None]
    if slopes:
        out += ["Fitted exponent `a` of `time ~ D^a`:", "",
                *_table(["impl", "mode", "slope", "fit sizes"],
                        [[r["impl"], r["mode"], r["slope"], r.get("fit_sizes")] for r in slopes])]
    return out


def _gpu_model(name, payload) -> list[str]:
    cols = ["kernel", "registers", "stack_bytes", "occupancy", "bound", "h100_pred_us", "h200_pred_us"]
    rows = [[r.get(c) for c in cols] for r in payload["results"] if r.get("kernel")]
    return ["## GPU resource and roofline model", "", _env(payload, name), "",
            "Compiled-kernel resources and the roofline prediction per kernel at 2^24 elements (no GPU "
            "timing: `fastflow bench gpu-model`):", "", *_table(cols, rows)]


def _train_digits(payload) -> list[str]:
    rows = []
    for key, r in payload.get("results", {}).items():
        if isinstance(r, dict):
            rows.append([key, r.get("test_log_likelihood_nats"), r.get("test_bits_per_dim"), r.get("median_step_ms"),
                         r.get("steps"), r.get("parameters")])
    cfg = payload.get("config", {})
    return ["## Training on the digits: fastflow against nflows", "",
            f"*From `benchmarks/results/train_digits.json`: {payload.get('date', '?')}, {payload.get('device', '?')}, "
            f"{payload.get('cpu_count', '?')} CPUs; {cfg.get('steps', '?')} steps, batch {cfg.get('batch', '?')}; "
            f"{cfg.get('timing', '')}.*", "",
            *_table(["model / library / seed", "test log-lik (nats)", "bits/dim", "median step ms", "steps",
                     "parameters"], rows)]


def _families(payload) -> list[str]:
    res = [r for r in payload.get("results", []) if "test_ll" in r]
    fams = list(dict.fromkeys(r["family"] for r in res))
    datas = list(dict.fromkeys(r["data"] for r in res))
    ll = {(r["data"], r["family"]): r["test_ll"] for r in res}
    return ["## Flow families: test log-likelihoods", "", _env(payload, "families_likelihoods_cpu.json"), "",
            "Test log-likelihood (nats per point or image; higher is better) after short CPU fits:", "",
            *_table(["data", *fams], [[d, *[ll.get((d, f)) for f in fams]] for d in datas])]


MODEL_IMPLS = ("fastflow", "fastflow + compile", "zuko", "zuko + compile", "nflows", "nflows + compile", "floor")


def _ms(v) -> str:
    return "" if not v else (f"{1e3 * v:.1f} ms" if v < 1 else f"{v:.2f} s")


def _models(files: list[Path]) -> list[str]:
    """Every models_*.json (one per size run); a later file's rows replace an earlier one's."""
    merged: dict = {}
    for f in files:
        payload = json.loads(f.read_text())
        for r in payload.get("results", []):
            if r.get("impl") in MODEL_IMPLS:
                merged[(r["size"], r["model"], r["case"], r["impl"])] = r
    rows = list(merged.values())
    envs = [_env(json.loads(f.read_text()), f.name) for f in files]
    groups = list(dict.fromkeys((r["size"], r["model"], r["case"]) for r in rows))
    by = {(r["size"], r["model"], r["case"], r["impl"]): r for r in rows}
    table = []
    for g in groups:
        cells = [*g]
        for i in MODEL_IMPLS:
            r = by.get((*g, i), {})
            cells.append(_ms(r.get("median_s")) or ("failed" if r.get("error") else ""))
        for i in ("fastflow", "fastflow + compile", "floor"):
            v = by.get((*g, i), {}).get("paired_speedup_vs_zuko_compile")
            cells.append("" if v is None else f"{v:.2f}x")
        table.append(cells)
    graphs = [[r["size"], r["model"], r["case"], r["impl"], r.get("graphs"), r.get("graph_breaks")]
              for r in rows if r.get("compiled") and r.get("graphs") is not None]
    return ["## Whole models: train step and sampling", "", *[e + "\n" for e in envs], "",
            "Each library's own model of the same architecture (parameter counts equal; `fastflow bench models`, "
            "whose module docstring gives the structures), float32. A train step is zero_grad + mean NLL + backward "
            "+ Adam (the same `torch.optim.Adam` for every row); sampling is `sample(batch)` under no_grad. "
            "Medians of interleaved rounds; the speed-ups are medians of per-round ratios to zuko + torch.compile. "
            "`floor` is the fastflow model with its elementwise laws replaced by a no-op: what the conditioners, "
            "permutations, base density and optimizer cost, a bound on what faster laws can gain.", "",
            *_table(["size", "model", "case", "fastflow", "fastflow + compile", "zuko", "zuko + compile", "nflows",
                     "nflows + compile", "floor", "fastflow vs zuko+c", "fastflow+c vs zuko+c", "floor vs zuko+c"],
                    table),
            "Graphs and graph breaks of each compiled function (`torch._dynamo.explain`):", "",
            *_table(["size", "model", "case", "implementation", "graphs", "breaks"], graphs)]


def _overhead(name, payload) -> list[str]:
    rows = [r for r in payload.get("results", []) if str(r.get("mode", "")).endswith(" fixed")]
    return ["## Fixed per-call cost of each op", "", _env(payload, name), "",
            "`fastflow bench overhead`: each op eager with `backend=None`, float32, timed at 2^8..2^12 elements; the "
            "fixed cost is the intercept of a least-squares line through the medians (forward; forward+backward "
            "with gradients for every input that takes one). The baseline row is one plain torch op through "
            "the same harness (call, sums, autograd graph, `torch.autograd.grad`); *over baseline* is what the "
            "op adds to that.", "",
            *_table(["op", "mode", "fixed cost (us)", "over baseline (us)", "per element (ns)",
                     "largest residual of the line"],
                    [[r["op"], r["mode"].replace(" fixed", ""), r.get("fixed_cost_us"), r.get("over_baseline_us"),
                      r.get("per_element_ns"), r.get("max_rel_residual")] for r in rows])]


def _page() -> tuple[str, dict]:
    images: dict[str, bytes] = {}
    out = ["# Performance", "",
           "Generated at build time from the JSON files in `benchmarks/results/` (written by "
           "`fastflow bench` and the scripts in `benchmarks/`); each section names its file, machine and date. "
           "Timings from a shared machine are indicative; ratios are of medians timed in the same run.", ""]
    for suite in ("spline", "coupling", "lu", "laws"):
        got = _latest(suite)
        if got:
            out += _speedups(suite, *got, images)
    model_files = sorted(RESULTS.glob("models_*_[0-9]*T[0-9]*.json"))
    if model_files:
        out += _models(model_files)
    got = _latest("overhead")
    if got:
        out += _overhead(*got)
    got = _latest("logdet")
    if got:
        out += _logdet(*got, images)
    got = _latest("gpu-model")
    if got:
        out += _gpu_model(*got)
    if (RESULTS / "train_digits.json").exists():
        out += _train_digits(json.loads((RESULTS / "train_digits.json").read_text()))
    if (RESULTS / "families_likelihoods_cpu.json").exists():
        out += _families(json.loads((RESULTS / "families_likelihoods_cpu.json").read_text()))
    files = sorted(p.name for p in RESULTS.glob("*.json"))
    out += ["## All result files", "", *_table(["file", "suite", "date"], [
        [f, *(lambda d: (d.get("suite") or d.get("benchmark"), (d.get("environment") or {}).get("date")
                         or d.get("date")))(json.loads((RESULTS / f).read_text()))] for f in files])]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)), images


def on_files(files, config):
    text, images = _page()
    files.append(File.generated(config, "performance.md", content=text))
    for uri, data in images.items():
        files.append(File.generated(config, uri, content=data))
    return files
