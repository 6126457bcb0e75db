"""The bench tests' one way to run ``fastflow bench`` in-process and read its exit code."""

from __future__ import annotations


def bench_exit_code(tmp_path, args) -> int:
    """``fastflow bench *args --out tmp_path``'s exit code (argparse's refusals included)."""
    from fastflow.cli.main import main

    try:
        return main(["bench", *args, "--out", str(tmp_path)])
    except SystemExit as e:  # argparse's refusal
        return e.code
