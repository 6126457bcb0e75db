import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a few hundred steps take seconds: realnvp needs no JIT compilation
# (nsf's Numba spline kernels take ~30 s to compile in every fresh process).
TINY = ["--model", "realnvp", "--model-arg", "hidden_features=16", "--model-arg", "num_layers=2",
        "--model-arg", "num_blocks=1"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests exercise the command-line machinery, not the kernels (tests/ops does): the pure
    torch reference backend spares every process the Numba JIT compilation (30-50 s each)."""
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")


def cli_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env["FASTFLOW_BACKEND"] = "reference"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_cli(*args, timeout=240, check=False, cwd=None) -> subprocess.CompletedProcess:
    """``python -m fastflow ARGS`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "fastflow", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastflow {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def main_cli(capsys):
    """Run ``fastflow ARGS`` in-process; returns (exit code, stderr)."""
    from fastflow.cli.main import main

    def call(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    return call
