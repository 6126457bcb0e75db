"""Adding a backend is one kernel folder and one registry line: a test-only backend that wraps the
reference (``tests/ops/_wrapped_backend``), registered by ``fastflow.backends.add_backend`` and
nothing else, passes the whole conformance suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "tests.ops._wrapped_backend"


def test_the_conformance_suite_runs_on_a_backend_added_in_one_line():
    env = {**os.environ, "FASTFLOW_TEST_EXTRA_BACKEND": PACKAGE, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/ops/test_conformance.py", "-q", "-k", "wrapped",
                             "-p", "no:cacheprovider", "-x"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed >= 100 and "failed" not in result.stdout, tail  # every op, every check


def test_add_backend_registers_and_routes(monkeypatch):
    import fastflow.backends as reg
    from fastflow.ops import rq_spline
    from tests.ops import _wrapped_backend

    monkeypatch.setattr(reg, "BACKENDS", dict(reg.BACKENDS))
    monkeypatch.setattr(reg, "_ORDER", reg._ORDER)
    reg.clear_resolution_cache()
    try:
        reg.add_backend(PACKAGE)
        with pytest.raises(ValueError, match="registered already"):
            reg.add_backend(PACKAGE)
        x = torch.randn(9, dtype=torch.float64)
        params = [torch.randn(9, 4, dtype=torch.float64) for _ in range(2)] + [torch.randn(9, 3, dtype=torch.float64)]
        before = _wrapped_backend.CALLS["count"]
        got = rq_spline(x, *params, backend="wrapped")
        want = rq_spline(x, *params, backend="reference")
        assert _wrapped_backend.CALLS["count"] > before
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert "wrapped" in reg.backend_status()["backends"]
        assert reg.resolve_backend("rq_spline", x) != "wrapped"  # last in the order: never a default here
    finally:
        reg.clear_resolution_cache()
