"""The residual / continuous rows of the ``logdet`` suite: every route runs, the exact routes agree
with the oracle, the estimators carry their error statistics, and the summary gives the speed-up
over the exact route at the largest D."""

from __future__ import annotations

import torch

from fastflow.bench import logdet
from fastflow.testing import jacobian_logabsdet


def test_residual_rows_and_summary():
    rows = logdet.run_residual(sizes=(8, 16), repeats=1)
    timed = [r for r in rows if r["mode"] == logdet.RESIDUAL_MODE]
    assert {r["impl"] for r in timed} == set(logdet.RESIDUAL_IMPLS) and {r["n"] for r in timed} == {8, 16}
    for r in timed:
        assert r["median_s"] > 0
        if r["impl"].endswith("exact"):
            assert "rel_rmse" not in r
        else:
            assert r["draws"] == logdet.ERROR_DRAWS and r["std"] > 0 and r["rmse"] >= abs(r["bias"]) - 1e-12
    at_largest = {r["impl"]: r for r in rows if r["mode"] == "residual_at_largest"}
    assert set(at_largest) == set(logdet.RESIDUAL_IMPLS)
    assert at_largest["resflow_exact"]["speedup_vs_exact"] == 1.0


def test_residual_case_exact_route_is_the_jacobian_slogdet():
    case = logdet.make_residual_case(8, dtype=torch.float64)
    fns = logdet.residual_callables(case)
    blk = case["block"]
    ref = jacobian_logabsdet(lambda v: v + blk.net(v), case["x"])
    torch.testing.assert_close(fns["resflow_exact"]().detach(), ref, rtol=1e-10, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: blk.net(v.reshape(1, -1)).reshape(-1), case["x"].reshape(-1))
    torch.testing.assert_close(fns["trace_exact"]().detach().reshape(()), torch.trace(jac), rtol=1e-10, atol=1e-10)
    assert float(torch.linalg.matrix_norm(jac, ord=2)) > 0.3  # the case is not a near-identity block
