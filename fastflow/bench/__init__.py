"""Benchmark harness shared by ``fastflow bench`` and ``benchmarks/``: median timings, ratios
measured in the same run, and JSON results carrying the device, library versions and date.

A suite is a module in this package with ``SUITE = "name"`` and
``run(device, sizes=None, repeats=..., quick=False) -> list[dict]``; each row has at least
``op, impl, mode, n, median_s`` (and ``ns_per_element`` where it makes sense).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

SUITES = ["spline", "lu", "logdet", "coupling"]
# Suites run only when named (``fastflow bench gpu-model``): the resource and roofline model
# compiles kernels rather than timing them.
EXTRA_SUITES = ["gpu-model", "integrations", "laws", "models", "overhead"]


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cpu", repeats: int = 7, warmup: int = 2, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` runs (after ``warmup`` runs), synchronising
    the device around each. Returns ``{"median_s", "min_s", "max_s", "repeats"}``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def _nothing():
    return None


def time_interleaved(calls: dict[str, Callable[[], object]], device="cpu", repeats: int = 7, warmup: int = 2,
                     setups: dict[str, Callable[[], object]] | None = None) -> dict:
    """Time several implementations of one case in alternation: each of ``repeats`` rounds runs
    every call once, the order rotating from round to round. Drift in the machine's speed
    (clock, memory traffic from other tenants of a VM, which moved one implementation's
    median by 1.5x between back-to-back runs here) then hits every implementation alike, so
    their ratios hold where medians timed one after another do not.

    ``setups``: name -> a call run untimed before each of that implementation's calls (warm-up
    included), e.g. switching an integration on or off.

    Returns ``{name: stats}``: ``time_fn``'s keys plus ``times`` (per round, in round order,
    for paired ratios), or ``{"error": "Type: message"}`` for a call that raised (it leaves the
    rotation; the others go on)."""
    out: dict = {}
    live = {}
    setups = setups or {}
    for name, fn in calls.items():
        try:
            setups.get(name, _nothing)()
            for _ in range(warmup):
                fn()
            sync(device)
            live[name] = fn
        except Exception as exc:  # a failing peer is a result, not a crash
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    times: dict = {name: [] for name in live}
    names = list(live)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)] if names else ():
            if name in out:
                continue
            try:
                setups.get(name, _nothing)()
                t0 = time.perf_counter()
                live[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for name in names:
        if name not in out:
            ts = times[name]
            out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": len(ts),
                         "times": ts}
    return {name: out[name] for name in calls}


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of ``base[i] / other[i]`` (two implementations timed in the same rounds
    of ``time_interleaved``): the speed-up of ``other`` over ``base``, round by round."""
    return statistics.median(b / o for b, o in zip(base, other))


_ALLOCATOR: str | None = None


def pin_allocator() -> str | None:
    """Fix glibc malloc's mmap and trim thresholds (32 MiB, 1 GiB) for the rest of the process.

    By default glibc moves its mmap threshold as blocks are freed and hands the top of the heap
    back to the kernel, so whether a 16 MiB tensor reuses warm pages or faults in 4096 fresh
    ones changes from one call to the next: on this VM a plain-PyTorch coupling step took 11.5
    or 57 ms depending on it (0 vs 16k page faults). Pinned, every implementation reuses warm
    memory after its warm-up, which removes that noise, and mostly to the benefit of the
    allocation-heavy eager baselines. Returns a description for the result file, or None where
    there is no glibc."""
    global _ALLOCATOR
    if _ALLOCATOR is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        except (OSError, AttributeError):
            ok = False
        _ALLOCATOR = "glibc, mmap threshold 32 MiB, trim threshold 1 GiB (pinned)" if ok else ""
    return _ALLOCATOR or None


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        pass
    try:  # packages without __version__ (nflows)
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def source() -> dict:
    """The code measured: the git commit and the files under fastflow/ that differ from it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastflow"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        return {"git_head": head or None, "uncommitted": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {"git_head": None}


def environment(device: str) -> dict:
    """Device name, versions and date recorded with every result file."""
    import fastflow

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": _ALLOCATOR or "default",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "fastflow": fastflow.__version__,
            **{m: _version(m) for m in ("torch", "numpy", "numba", "triton", "cupy", "nflows", "zuko")},
        },
    }


def add_ratios(rows: list[dict], baselines=("nflows", "reference")) -> list[dict]:
    """Attach ``speedup_vs_<baseline>`` (baseline median / this median) for rows of the same
    op/mode/size/dtype measured in this run."""
    key = lambda r: (r["op"], r["mode"], r["n"], r.get("dtype"), r.get("k"))  # noqa: E731
    index = {(key(r), r["impl"]): r["median_s"] for r in rows if r.get("median_s")}
    for r in rows:
        for b in baselines:
            base = index.get((key(r), b))
            if base and r.get("median_s"):
                r[f"speedup_vs_{b}"] = base / r["median_s"]
    return rows


def speedup_bars(rows: list[dict], baseline: str):
    """What :func:`plot_speedups` draws: the (op, mode, n) groups the baseline was timed in (in
    row order), and per other implementation its ``(group index, baseline median / its
    median)`` points. Rows without a median (errors) are left out."""
    timed = [r for r in rows if r.get("median_s") and r.get("impl")]
    base = {(r["op"], r["mode"], r["n"]): r["median_s"] for r in timed if r["impl"] == baseline}
    groups = [g for g in dict.fromkeys((r["op"], r["mode"], r["n"]) for r in timed) if g in base]
    median = {(r["op"], r["mode"], r["n"], r["impl"]): r["median_s"] for r in timed}
    impls = [i for i in dict.fromkeys(r["impl"] for r in timed) if i != baseline]
    bars = {impl: [(i, base[g] / median[(*g, impl)]) for i, g in enumerate(groups) if (*g, impl) in median]
            for impl in impls}
    return groups, bars


def plot_speedups(rows: list[dict], path: str | Path, baseline: str, title: str) -> Path:
    """Bar chart of each implementation's speed-up over ``baseline`` (ratio of the medians of one
    run; log scale, 1 marked) for every (op, mode, n) the rows time; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, bars = speedup_bars(rows, baseline)
    impls = list(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(groups) + 2.0), 4.8))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        pts = bars[impl]
        if pts:
            xs, ys = zip(*pts)
            ax.bar([x + (k - (len(impls) - 1) / 2) * width for x in xs], ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    def wrap(name):  # long op names on two lines, split at the underscore nearest the middle
        cuts = [i for i, ch in enumerate(name) if ch == "_"]
        if len(name) <= 14 or not cuts:
            return name
        i = min(cuts, key=lambda c: abs(c - len(name) / 2))
        return name[:i] + "\n" + name[i + 1:]

    ax.set_xticklabels([f"{wrap(op)}\n{mode}\nn={n}" for op, mode, n in groups], fontsize=6)
    ax.set_ylabel(f"speed-up over {baseline} (ratio of medians)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def get_suite(name: str):
    if name not in SUITES + EXTRA_SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; expected one of {SUITES + EXTRA_SUITES}")
    return importlib.import_module(f"fastflow.bench.{name.replace('-', '_')}")
