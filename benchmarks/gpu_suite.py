"""The one prepared device run: ``python benchmarks/gpu_suite.py OUTDIR [--dry-run]``.

On one H100/H200 it runs, each phase in its own subprocess with its own timeout (a hang in one
cannot eat the others' time), in at most ~8 minutes wall:

1. ``env``: GPU, driver, versions, and a device-to-device copy-bandwidth probe (bytes read +
   written over time, median of CUDA-event timings) - the measured HBM ceiling;
2. ``tests``: pytest on the device of every op x backend against the reference
   (``tests/ops``) and the gpu-marked / float64 / launch tests (``tests/gpu_readiness``);
3. ``bench``: every op x backend against torch eager, torch.compile, nflows and zuko, through
   ``fastflow bench spline coupling lu`` at 2^20 .. 2^26 elements;
4. ``model``: ``fastflow bench gpu-model`` (the prediction) and a roofline PNG of the measured
   spline/coupling times against it;
5. ``train``: ``benchmarks/gpu_train.py``: no host synchronisation inside any op
   (``torch.cuda.set_sync_debug_mode("error")``), the train step under autocast float16 (with a
   GradScaler) and bfloat16 against float32, and step times eager, ``fastflow.compile`` and with
   CUDA graphs.

At most 8 files land in OUTDIR: ``env.json``, ``tests.log``, ``bench.json`` (the three suites),
``model.json``, ``roofline.png``, ``train.json``, ``suite.log``. ``--dry-run`` runs every phase on the CPU at
tiny sizes (the triton backend through ``TRITON_INTERPRET=1``), so CI exercises every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Timeout of each phase on the device, in seconds: 475 s of an 8.5-minute wall (the rest is
# process start-up). The bench share is split evenly over the suites.
PHASES = {"env": 30, "tests": 130, "bench": 200, "model": 40, "plot": 15, "train": 60}
BENCH_SUITES = ("spline", "coupling", "lu")
SIZES = "2**20,2**22,2**24,2**26"
DRY_SIZES = "2**6"


def _log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "suite.log", "a") as f:
        f.write(line + "\n")


def _run(out: Path, name: str, cmd: list[str], timeout: float, env: dict, log_file: Path | None = None) -> dict:
    t0 = time.time()
    _log(out, f"{name}: {' '.join(cmd)} (timeout {timeout:.0f} s)")
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        rc, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(f"\n==== {name}: rc={rc}\n{text}")
    else:
        with open(out / "suite.log", "a") as f:
            f.write(text[-20000:])
    last = text.strip().splitlines()[-1] if text.strip() else ""
    _log(out, f"{name}: rc={rc} in {time.time() - t0:.1f} s; last line: {last}")
    return {"phase": name, "rc": rc, "seconds": time.time() - t0}


# ------------------------------------------------------------------------------- phase: env


def phase_env(out: Path, dry: bool) -> None:
    """Writes env.json: device, versions, and the copy-bandwidth probe."""
    import torch

    from fastflow.bench import environment

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    env = environment(device)
    n = 2**14 if dry else 2**28  # float32 elements: 1 GiB each way on the device, far past L2
    a = torch.rand(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(3 if dry else 20):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    env["copy_probe"] = {"bytes": 2 * n * 4, "median_s": med, "bytes_per_s": 2 * n * 4 / med,
                         "method": "b.copy_(a), float32, bytes read + written over the median event time"}
    env["dry_run"] = dry
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "sms": p.multi_processor_count, "memory": p.total_memory,
                      "capability": f"{p.major}.{p.minor}"}
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                                                "--format=csv"], capture_output=True, text=True, timeout=10).stdout
        except Exception as exc:  # informative only
            env["nvidia_smi"] = repr(exc)
    (out / "env.json").write_text(json.dumps(env, indent=2))


# ------------------------------------------------------------------------------- phase: model


def phase_plot(out: Path) -> None:
    """roofline.png: measured ns/element (bench JSON) against the model's prediction (model.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = json.loads((out / "model.json").read_text())["results"] if (out / "model.json").exists() else []
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    gpu = "H200" if "H200" in str(env.get("device_name", "")) else "H100 SXM"
    fig, ax = plt.subplots(figsize=(9, 5))
    pred = {}
    for r in model:
        if r["impl"] == "triton" and r.get("k") in (8, None) and r["dtype"] == "float32":
            pred[(r["op"].split("[")[0], r["mode"])] = r["roofline"][gpu]["pred_s"] / r["n"] * 1e9
    suites = json.loads((out / "bench.json").read_text())["suites"] if (out / "bench.json").exists() else {}
    for name in BENCH_SUITES:
        if name not in suites:
            continue
        rows = [r for r in suites[name]["results"] if r.get("ns_per_element")]
        for impl in sorted({r["impl"] for r in rows}):
            for mode in ("forward", "forward+backward"):
                pts = sorted((r["n"], r["ns_per_element"]) for r in rows if r["impl"] == impl and r["mode"] == mode
                             and r["op"] in ("rq_spline", "affine_coupling"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{name} {impl} {mode}", linewidth=1)
    for (op, mode), ns in pred.items():
        if op in ("rq_spline", "affine_coupling") and mode == "forward":
            ax.axhline(ns, linestyle="--", linewidth=0.8, color="black")
            ax.text(1, ns, f" model {op} {mode} ({gpu})", fontsize=6, transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("elements")
    ax.set_ylabel("ns per element (median)")
    ax.set_title(f"measured vs the gpu-model roofline ({env.get('device_name', '?')})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "roofline.png", dpi=110)


# ------------------------------------------------------------------------------- driver


def _merge_bench(out: Path, name: str, parts: list[Path]) -> None:
    """The suite's entry in bench.json from its per-size result files (rows concatenated, first
    environment): ``{"suites": {name: {"suite", "environment", "results"}}}``."""
    payloads = [json.loads(p.read_text()) for p in parts]
    if payloads:
        path = out / "bench.json"
        merged = json.loads(path.read_text()) if path.exists() else {"suites": {}}
        merged["suites"][name] = {"suite": name, "environment": payloads[0]["environment"],
                                  "results": [r for p in payloads for r in p["results"]]}
        path.write_text(json.dumps(merged, indent=2))


def _clean(tmp: Path) -> None:
    if tmp.exists():
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="every phase on the CPU at tiny sizes")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "env":
        phase_env(out, args.dry_run)
        return 0
    if args.phase == "plot":
        phase_plot(out)
        return 0

    dry = args.dry_run
    (out / "suite.log").write_text("")
    # The device has no fastflow install: the checkout goes on the path (after carried wheels).
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path,
               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    if dry:
        # On the CPU: triton through the interpreter, and torch.compile's peers run eagerly
        # (inductor's C++ build of every case would take minutes; the harness path is the same).
        env.update(TRITON_INTERPRET="1", TORCHDYNAMO_DISABLE="1")
    budget = {k: v * (3.0 if dry else 1.0) for k, v in PHASES.items()}
    py = sys.executable
    me = str(Path(__file__).resolve())
    results = [_run(out, "env", [py, me, str(out), "--phase", "env"] + (["--dry-run"] if dry else []),
                    budget["env"], env)]
    # tests: every op x GPU backend against the reference (the triton/gpu-marked cases of
    # tests/ops) and the float64 kernels; dry: a subset of the latter under the interpreter.
    tcmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton or gpu"]
    if dry:
        tcmd += ["tests/gpu_readiness/test_triton_float64.py", "-k", "2-False or exp-False or picks or only"]
    else:
        tcmd += ["tests/ops", "tests/gpu_readiness"]
    results.append(_run(out, "tests", tcmd, budget["tests"], env, log_file=out / "tests.log"))
    # bench: one process per (suite, size), smallest first, each bounded by what is left of its
    # suite's share: a hang or an out-of-memory at 2^26 loses that size only.
    sizes = DRY_SIZES.split(",") if dry else SIZES.split(",")
    share = budget["bench"] / len(BENCH_SUITES)
    for name in BENCH_SUITES:
        tmp = out / f".bench_{name}"
        _clean(tmp)
        deadline = time.time() + share
        for size in sizes:
            left = deadline - time.time()
            if left < 5:
                _log(out, f"bench {name} {size}: skipped, the suite's {share:.0f} s share is spent")
                continue
            cmd = [py, "-m", "fastflow", "bench", name, "--repeats", "2" if dry else "5", "--out", str(tmp),
                   "--sizes", size, "--device", "cpu" if dry else "cuda"]
            results.append(_run(out, f"bench {name} {size}", cmd, left, env))
        _merge_bench(out, name, sorted(tmp.glob("*.json")) if tmp.exists() else [])
        _clean(tmp)
    # model: the prediction, then the plot of the measurements against it
    tmp = out / ".model"
    _clean(tmp)
    menv = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}  # the model compiles for sm_90
    results.append(_run(out, "model", [py, "-m", "fastflow", "bench", "gpu-model", "--out", str(tmp)]
                        + (["--quick"] if dry else []), budget["model"], menv))
    found = sorted(tmp.glob("*.json")) if tmp.exists() else []
    if found:
        found[-1].replace(out / "model.json")
    _clean(tmp)
    results.append(_run(out, "plot", [py, me, str(out), "--phase", "plot"], budget["plot"], env))
    # train: whole models on the device (sync check, autocast float16/bfloat16, compiled steps)
    results.append(_run(out, "train", [py, str(ROOT / "benchmarks" / "gpu_train.py"), str(out / "train.json")]
                        + (["--dry-run"] if dry else []), budget["train"], env))
    _log(out, "summary: " + json.dumps(results))
    print("\n| phase | rc | seconds |\n|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['rc']} | {r['seconds']:.1f} |")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
