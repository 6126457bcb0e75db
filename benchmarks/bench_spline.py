"""pytest-benchmark over the spline suite's cases: `pytest benchmarks/bench_spline.py`.

Each implementation (every available fastflow backend, nflows, zuko, and the two peers under
`torch.compile`) on the same inputs; `fastflow bench spline` (and `python -m fastflow.bench.spline`
for K sweeps) runs the same cases in alternating rounds and writes the JSON results with ratios.
A compiled peer is compiled for its case (after a dynamo reset) and warmed before it is timed.
"""

import pytest
import torch

from fastflow.bench.spline import COMPILED, _fresh, _impls, _inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = _impls(DEVICE, torch.float32)


@pytest.mark.parametrize("n", [2**16, 2**20])
@pytest.mark.parametrize("k", [8])
@pytest.mark.parametrize("mode", ["forward", "inverse", "forward+backward"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_spline(benchmark, impl, mode, k, n):
    fn = _fresh(IMPLS)[impl] if impl in COMPILED else IMPLS[impl]
    x, uw, uh, ud = _inputs(n, k, DEVICE, torch.float32)
    benchmark.group = f"rq_spline {mode} n={n} k={k}"
    if mode == "forward+backward":
        leaves = [t.clone().requires_grad_(True) for t in (x, uw, uh, ud)]

        def run():
            out, lad = fn(leaves[0], leaves[1:], False)
            (out.sum() + lad.sum()).backward()
    else:
        inverse = mode == "inverse"
        inp = IMPLS["reference"](x, (uw, uh, ud), False)[0].detach() if inverse else x

        def run():
            with torch.no_grad():
                return fn(inp, (uw, uh, ud), inverse)

    if DEVICE == "cuda":
        def timed():
            run()
            torch.cuda.synchronize()
    else:
        timed = run
    if impl in COMPILED:  # compile and warm, untimed
        timed()
        timed()
    benchmark(timed)
