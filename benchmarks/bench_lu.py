"""pytest-benchmark wrappers of the ``lu`` suite's cases (``fastflow bench lu`` is the full run).

    .venv/bin/python -m pytest benchmarks/bench_lu.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastflow.bench import lu as suite

pytest.importorskip("pytest_benchmark")

N = 2**18
IMPLS = ["reference", "torch_eager"]  # torch_compile is timed by the suite (compilation dominates here)


@pytest.mark.parametrize("op", list(suite.CASES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "inverse", "forward+backward"])
def test_lu(benchmark, op, impl, mode):
    t = suite.make_case(op, N)
    fn = suite.fastflow_fn(op, impl) if impl in ("reference", "triton") else suite.torch_dense(op)
    if mode == "forward+backward":
        leaves = {k: (v.detach().clone().requires_grad_(k == "x" or k in suite.PARAMS) if v.is_floating_point() else v)
                  for k, v in t.items()}

        def call():
            y, lad = fn(leaves, False)
            (y.sum() + lad.sum()).backward()
            for v in leaves.values():
                v.grad = None
    else:
        def call():
            with torch.no_grad():
                return fn(t, mode == "inverse")

    benchmark(call)
