"""The device suite's dry run: every phase of benchmarks/gpu_suite.py on the CPU at tiny sizes,
so the one prepared GPU script cannot rot between the rare device runs (~2-3 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="runs once, in the plain pytest pass (the suite sets the interpreter itself)")
def test_gpu_suite_dry_run(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), str(tmp_path), "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "suite.log").read_text() if (tmp_path / "suite.log").exists() else res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    expected = {"env.json", "tests.log", "bench.json", "model.json", "roofline.png", "train.json", "suite.log"}
    assert set(files) == expected, files
    env_json = json.loads((tmp_path / "env.json").read_text())
    assert env_json["dry_run"] and env_json["copy_probe"]["bytes_per_s"] > 0
    suites = json.loads((tmp_path / "bench.json").read_text())["suites"]
    for name in ("spline", "coupling", "lu"):
        rows = suites[name]["results"]
        impls = {r["impl"] for r in rows if r.get("median_s")}
        assert "triton" in impls, (name, impls)  # the interpreter ran the kernels
    model = json.loads((tmp_path / "model.json").read_text())["results"]
    assert model and all(r["registers"] > 0 for r in model)
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["dry_run"] and {r["model"] for r in train["precision"]} == {"nsf", "realnvp", "maf"}
    assert all(r.get("ok", True) and r.get("finite", True) for r in train["precision"]), train["precision"]
    assert any(r["precision"] == "autocast bfloat16" for r in train["precision"])
    assert train["timings"] and all(r.get("median_s", 0) > 0 for r in train["timings"]), train["timings"]
