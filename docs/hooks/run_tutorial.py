"""Runs one tutorial script cell by cell and records what each cell printed and drew.

    python docs/hooks/run_tutorial.py SCRIPT OUT_DIR

A script is plain Python split into cells by ``# %%`` lines (the sphinx-gallery / jupytext
convention); the comment lines that open a cell are its Markdown text, the module docstring is the
page's title and introduction. Every cell runs in one namespace (``__name__ == "__main__"``);
after each, the open matplotlib figures are saved as PNGs in OUT_DIR and closed. OUT_DIR/cells.json
gets ``[{"text", "code", "stdout", "images"}]``. An exception ends the run with status 1 and the
traceback, so a failing tutorial fails the docs build.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path


def parse(source: str) -> tuple[str, list[dict]]:
    """(docstring, [{"text", "code"}]) of a tutorial script."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree, clean=True) or ""
    lines = source.splitlines()
    start = 0
    if doc and tree.body and isinstance(tree.body[0], ast.Expr):
        start = tree.body[0].end_lineno
    cells, current = [], None
    for line in lines[start:]:
        if line.startswith("# %%"):
            current = {"text": [], "code": [], "in_text": True}
            cells.append(current)
            continue
        if current is None:
            current = {"text": [], "code": [], "in_text": False}
            cells.append(current)
        if current["in_text"] and (line.startswith("#") or (not line.strip() and not current["text"])):
            if line.startswith("#"):
                current["text"].append(line[2:] if line.startswith("# ") else line[1:])
            continue
        current["in_text"] = False
        current["code"].append(line)
    out = [{"text": "\n".join(c["text"]).strip(), "code": "\n".join(c["code"]).strip("\n")} for c in cells]
    return doc, [c for c in out if c["text"] or c["code"].strip()]


def main(script: str, out_dir: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, out = Path(script).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc, cells = parse(path.read_text())
    namespace = {"__name__": "__main__", "__file__": str(path)}
    records, t0 = [], time.perf_counter()
    os.chdir(out)  # files a tutorial writes land in its scratch folder
    for i, cell in enumerate(cells):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(cell["code"] or "pass", f"{path.name} (cell {i + 1})", "exec"), namespace)
        except BaseException:
            sys.stderr.write(buf.getvalue())
            sys.stderr.write(f"tutorial {path.name} failed in cell {i + 1}:\n{cell['code']}\n\n")
            traceback.print_exc()
            return 1
        images = []
        for j, num in enumerate(plt.get_fignums()):
            name = f"{path.stem}_{i + 1:02d}_{j + 1}.png"
            plt.figure(num).savefig(out / name, dpi=90, bbox_inches="tight")
            images.append(name)
        plt.close("all")
        records.append({**cell, "stdout": buf.getvalue(), "images": images})
    (out / "cells.json").write_text(json.dumps({"doc": doc, "cells": records,
                                                "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
