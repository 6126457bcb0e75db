"""pytest-benchmark wrappers of the ``logdet`` suite's cases: the O(D) log-det of the LU
parameterisation against slogdet and the naive Jacobian route (``fastflow bench logdet`` fits the
slopes and draws the plot).

    .venv/bin/python -m pytest benchmarks/bench_logdet.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastflow.bench import logdet as suite

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("d", [16, 128, 512])
@pytest.mark.parametrize("impl", list(suite.IMPLS))
def test_logdet(benchmark, impl, d):
    fn = suite.callables(suite.make_case(d))[impl]
    with torch.enable_grad() if impl == "naive_jacobian" else torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("d", [16, 128, 512])
@pytest.mark.parametrize("impl", list(suite.RESIDUAL_IMPLS))
def test_residual_logdet(benchmark, impl, d):
    """Residual-flow / CNF log-det routes of one residual block (each call includes g's forward)."""
    fn = suite.residual_callables(suite.make_residual_case(d))[impl]
    benchmark(fn)
