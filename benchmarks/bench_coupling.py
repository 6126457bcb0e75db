"""pytest-benchmark wrappers of the ``coupling`` suite's cases (``fastflow bench coupling`` is the
full run, with the speed-ups against eager and torch.compile measured in the same run).

    .venv/bin/python -m pytest benchmarks/bench_coupling.py --benchmark-only
"""

from __future__ import annotations

import pytest

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
    call = suite.case_call(impls[impl], make(B), mode)
    call()  # compile/JIT outside the timing
    benchmark(call)
