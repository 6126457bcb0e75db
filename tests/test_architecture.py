"""ARCHITECTURE.md's code blocks run as written (so the worked examples cannot rot), and the
layering it states holds: no module imports a room above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "ARCHITECTURE.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_architecture_has_code_blocks():
    assert _blocks(), "ARCHITECTURE.md lost its worked example"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_architecture_code_block_runs(index):
    exec(compile(_blocks()[index], f"ARCHITECTURE.md block {index}", "exec"), {"__name__": "architecture_example"})


# lower rooms may not import these higher ones
ABOVE = {
    "kernels": ("fastflow.ops", "fastflow.nn", "fastflow.flows", "fastflow.cli", "fastflow.integrations",
                "fastflow.bench"),
    "ops": ("fastflow.nn", "fastflow.flows", "fastflow.cli", "fastflow.integrations", "fastflow.bench"),
    "nn": ("fastflow.flows", "fastflow.cli", "fastflow.integrations", "fastflow.bench"),
    "flows": ("fastflow.cli", "fastflow.integrations", "fastflow.bench"),
}


@pytest.mark.parametrize("room", sorted(ABOVE))
def test_no_upward_imports(room):
    bad = []
    for path in (REPO / "fastflow" / room).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(REPO)} imports {n}" for n in names if n.startswith(ABOVE[room])]
    assert not bad, bad
