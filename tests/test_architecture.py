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


def _rooms():
    """The rooms of ARCHITECTURE.md's table, top to bottom: ``fastflow/<room>/`` or ``fastflow/<room>.py``."""
    table = DOC.read_text().split("## The rooms", 1)[1].split("## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `fastflow/(\w+)(?:/|\.py)", table, flags=re.M)]


ROOMS = _rooms()


def test_the_table_names_every_room():
    present = {p.stem if p.is_file() else p.name for p in (REPO / "fastflow").iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.stem.startswith("_"))}
    assert set(ROOMS) == present, (ROOMS, sorted(present))


@pytest.mark.parametrize("room", ROOMS)
def test_no_upward_imports(room):
    above = tuple(f"fastflow.{r}" for r in ROOMS[:ROOMS.index(room)])
    base = REPO / "fastflow" / room
    files = base.rglob("*.py") if base.is_dir() else [base.with_suffix(".py")]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(REPO)} imports {n}" for n in names
                    if any(n == a or n.startswith(a + ".") for a in above)]
    assert not bad, bad
