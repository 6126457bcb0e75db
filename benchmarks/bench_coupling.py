"""pytest-benchmark wrappers of the ``coupling`` suite's cases (``fastflow bench coupling`` is the
full run, with the speed-ups against eager and torch.compile measured in the same run).

    .venv/bin/python -m pytest benchmarks/bench_coupling.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastflow.bench import coupling as suite

pytest.importorskip("pytest_benchmark")

B = 2**16  # at D = suite.D = 64 features
CASES = suite.cases()


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("impl", ["numba", "reference", "eager", "compile"])
@pytest.mark.parametrize("mode", ["forward", "inverse", "forward+backward"])
def test_coupling(benchmark, op, impl, mode):
    make, impls = CASES[op]
    if impl not in impls:
        pytest.skip(f"{impl} cannot run here")
    fn = impls[impl]
    tensors = make(B)
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

    call()  # compile/JIT outside the timing
    benchmark(call)
