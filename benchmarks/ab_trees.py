"""Before/after A/B of two checkouts of fastflow on this machine: fastflow's own calls (default
backend choice, plus forced numba where it matters), each tree in its own process, the two
alternating round by round; medians over rounds of per-round medians.

    PYTHONPATH=. python benchmarks/ab_trees.py BEFORE_DIR AFTER_DIR [--rounds 5] [--out FILE]

``AB_SIZES`` (comma-separated element counts, default 256,4096,65536,1048576) and ``AB_REPS``
(timed calls per case and process, default 15) narrow it, e.g. to the per-call overhead:
``AB_SIZES=256,4096 AB_REPS=200 ... --rounds 8``.

A refactor that should not change speed shows ratios near 1. The two processes of a round swap
places every round (the second of a pair runs warmer, by up to 15% on a shared 2-core machine),
so use an even number of rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

_SIDE = r'''
import json, os, statistics, sys, time
import torch
import fastflow as ff
from fastflow.ops.rq_spline import rq_spline_zuko

torch.manual_seed(0)
res = {}


def t(name, fn, reps=int(os.environ.get("AB_REPS", "15"))):
    fn(); fn()
    ts = []
    for _ in range(reps):
        s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    res[name] = statistics.median(ts)


for n in [int(v) for v in os.environ.get("AB_SIZES", "256,4096,65536,1048576").split(",")]:
    k = 8
    x = torch.randn(n) * 0.6
    uw, uh, ud = torch.randn(n, k, requires_grad=True), torch.randn(n, k), torch.randn(n, k - 1)
    t(f"rq_spline forward {n}", lambda: ff.rq_spline(x, uw.detach(), uh, ud))
    t(f"rq_spline inverse {n}", lambda: ff.rq_spline(x, uw.detach(), uh, ud, inverse=True))

    def fb():
        y, lad = ff.rq_spline(x, uw, uh, ud); (y.sum() + lad.sum()).backward()
    t(f"rq_spline forward+backward {n}", fb)

    def zfb():
        y, lad = rq_spline_zuko(x, uw, uh, ud); (y.sum() + lad.sum()).backward()
    t(f"rq_spline_zuko forward+backward {n}", zfb)
    d = 64; b = n // d
    xx, sh, h = torch.randn(b, d), torch.randn(b, d), torch.randn(b, d, requires_grad=True)
    t(f"affine_coupling forward {n}", lambda: ff.affine_coupling(xx, sh, h.detach()))

    def afb():
        y, lad = ff.affine_coupling(xx, sh, h); (y.sum() + lad.sum()).backward()
    t(f"affine_coupling forward+backward {n}", afb)
    t(f"affine_coupling[numba] forward {n}", lambda: ff.affine_coupling(xx, sh, h.detach(), backend="numba"))
    t(f"additive_coupling forward {n}", lambda: ff.additive_coupling(xx, sh))
    t(f"rescale[numba] forward {n}", lambda: ff.rescale(xx, sh[0], backend="numba"))

    def rfb():
        y, lad = ff.rescale(xx, h[0]); (y.sum() + lad.sum()).backward()
    t(f"rescale forward+backward {n}", rfb)
    for c in (16, 64):
        xi = torch.randn(max(1, n // (c * 64)), c, 8, 8)
        perm = torch.randperm(c)
        lo, up = (torch.randn(c, c) * 0.1).requires_grad_(), torch.randn(c, c) * 0.1
        ls, sg = torch.randn(c) * 0.1, torch.ones(c)
        t(f"lu_conv1x1 C={c} forward {n}", lambda: ff.lu_conv1x1(xi, perm, lo.detach(), up, ls, sg))
        t(f"lu_conv1x1 C={c} inverse {n}", lambda: ff.lu_conv1x1(xi, perm, lo.detach(), up, ls, sg, inverse=True))

        def lfb():
            y, lad = ff.lu_conv1x1(xi, perm, lo, up, ls, sg); (y.sum() + lad.sum()).backward()
        t(f"lu_conv1x1 C={c} forward+backward {n}", lfb)
json.dump({"times": res, "torch": torch.__version__, "fastflow": ff.__file__}, open(sys.argv[1], "w"))
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "side.py")
        with open(script, "w") as f:
            f.write(_SIDE)
        for r in range(a.rounds):
            # the order alternates round by round: the second process of a round runs warmer
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = os.path.join(tmp, f"{side}{r}.json")
                env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(a, side)))
                subprocess.run([sys.executable, script, out], env=env, check=True, cwd=tmp)
                runs[side].append(json.load(open(out)))
    rows = []
    for key in runs["before"][0]["times"]:
        b = statistics.median(x["times"][key] for x in runs["before"])
        f = statistics.median(x["times"][key] for x in runs["after"])
        call, n = key.rsplit(" ", 1)
        rows.append({"call": call, "n": int(n), "before_s": b, "after_s": f, "after_over_before": f / b})
    ratios = [r["after_over_before"] for r in rows]
    import torch

    result = {"suite": "ab_trees", "date": datetime.now(timezone.utc).isoformat(), "device": "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": a.rounds,
              "before": a.before, "after": a.after, "results": rows,
              "geomean_after_over_before": statistics.geometric_mean(ratios)}
    print("| call | n | before (us) | after (us) | after/before |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['call']} | {r['n']} | {r['before_s'] * 1e6:.0f} | {r['after_s'] * 1e6:.0f} | "
              f"{r['after_over_before']:.2f} |")
    print(f"geometric mean after/before: {result['geomean_after_over_before']:.3f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print("results:", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
