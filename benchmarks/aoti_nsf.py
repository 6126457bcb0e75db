"""Eager vs exported vs AOTInductor: ``nsf`` log_prob on the CPU at batch 1, 64 and 4096 (issue 28).

    python benchmarks/aoti_nsf.py --out benchmarks/results/aoti_nsf.json [--rounds 30] [--quick]

Rounds are interleaved (each round times every variant at every batch once), so drift in the
machine's load hits all variants alike; the JSON holds the per-round times, their medians, the
ratios to eager and the versions. Run it on a quiet machine. The AOTInductor package is loaded
back from its file (``torch._inductor.aoti_load_package``) before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastflow
from fastflow.flows import build
from fastflow.flows.export import LogProb, export_flow

BATCHES = (1, 64, 4096)


def _time(fn, x, reps):
    fn(x)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="3 rounds, batch 1 and 64 only (a dry run)")
    args = ap.parse_args(argv)
    batches = BATCHES[:2] if args.quick else BATCHES
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)
    flow = build("nsf", (6,)).eval()
    eager = LogProb(flow)
    program = export_flow(flow, "log_prob", dynamic_batch=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(d) / "nsf.pt2"))
        compile_s = time.perf_counter() - t0
        aoti = torch._inductor.aoti_load_package(path)
        variants = {"eager": eager, "exported": program.module(), "aoti": aoti}
        xs = {b: torch.randn(b, 6) for b in batches}
        with torch.no_grad():
            for b, x in xs.items():  # all three agree before anything is timed
                ref = eager(x)
                for name, fn in variants.items():
                    torch.testing.assert_close(fn(x), ref, rtol=1e-4, atol=1e-4, msg=f"{name} at batch {b}")
            times = {name: {b: [] for b in batches} for name in variants}
            for _ in range(rounds):
                for b, x in xs.items():
                    reps = max(1, 2000 // b)
                    for name, fn in variants.items():
                        times[name][b].append(_time(fn, x, reps))
    medians = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}
    result = {
        "what": "nsf (6,) log_prob, CPU float32", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds,
        "versions": {"fastflow": fastflow.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "aoti_compile_s": compile_s,
        "median_s": {name: {str(b): m for b, m in per.items()} for name, per in medians.items()},
        "speedup_vs_eager": {name: {str(b): medians["eager"][b] / per[b] for b in batches}
                             for name, per in medians.items()},
        "times_s": {name: {str(b): v for b, v in per.items()} for name, per in times.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'batch':>6} " + " ".join(f"{n:>12}" for n in variants))
    for b in batches:
        print(f"{b:>6} " + " ".join(f"{medians[n][b] * 1e6:>10.1f}us" for n in variants))
    print(f"AOTInductor compile {compile_s:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
