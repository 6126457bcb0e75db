"""MkDocs hook: executes the tutorial scripts in docs/tutorials/*.py and makes a page of each.

Every script runs in its own process (docs/hooks/run_tutorial.py), several at once, each with one
thread; a script that raises fails the build (whatever ``--strict`` says). Each page shows the
cells' text, code, printed output and figures, and links the script itself. Pages written by hand
in content/tutorials/ (index.md, hpc.md) are left alone.

Environment:
    FASTFLOW_DOCS_QUICK=1   the scripts use tiny settings (CI); they read it themselves.
    FASTFLOW_DOCS_CACHE=1   reuse a script's results while neither it nor the quick flag changed
                            (``scripts/docs.sh serve`` sets it, so live reload does not retrain).
    FASTFLOW_DOCS_JOBS=N    scripts run at once (default: the number of CPUs, at most 4).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.tutorials")
DOCS = Path(__file__).resolve().parents[1]
SCRIPTS = DOCS / "tutorials"
CACHE = DOCS / ".cache" / "tutorials"


def _key(script: Path) -> str:
    quick = os.environ.get("FASTFLOW_DOCS_QUICK", "0")
    return hashlib.sha256(script.read_bytes() + quick.encode()).hexdigest()[:16]


def _run(script: Path) -> Path:
    key = _key(script)
    done = CACHE / f"{script.stem}-{key}"
    if os.environ.get("FASTFLOW_DOCS_CACHE") == "1" and (done / "cells.json").exists():
        return done
    work = Path(tempfile.mkdtemp(prefix=f"fastflow-docs-{script.stem}-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(DOCS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(DOCS / "hooks" / "run_tutorial.py"), str(script), str(work)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PluginError(f"tutorial {script.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    if os.environ.get("FASTFLOW_DOCS_CACHE") == "1":
        shutil.rmtree(done, ignore_errors=True)
        done.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work, done)
    return work


def _page(script: Path, result: Path, quick: bool) -> tuple[str, list[str]]:
    data = json.loads((result / "cells.json").read_text())
    out, images = [data["doc"], ""], []
    for cell in data["cells"]:
        if cell["text"]:
            out += [cell["text"], ""]
        if cell["code"].strip():
            out += ["```python", cell["code"], "```", ""]
        if cell["stdout"].strip():
            out += ['```text title="output"', cell["stdout"].rstrip(), "```", ""]
        for name in cell["images"]:
            out += [f"![{script.stem}](img/{name})", ""]
            images.append(name)
    mode = "tiny settings (FASTFLOW_DOCS_QUICK=1)" if quick else "full settings"
    out += ["---", "", f"*Executed when these docs were built, with {mode}, in {data['seconds']:.0f} s on "
            f"{os.cpu_count()} CPU core(s). The script: [`{script.name}`](scripts/{script.name}).*", ""]
    return "\n".join(out), images


def on_files(files, config):
    scripts = sorted(SCRIPTS.glob("*.py"))
    quick = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
    jobs = int(os.environ.get("FASTFLOW_DOCS_JOBS", min(4, os.cpu_count() or 1)))
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(scripts, pool.map(_run, scripts)))
    for script, result in results.items():
        text, images = _page(script, result, quick)
        files.append(File.generated(config, f"tutorials/{script.stem}.md", content=text))
        files.append(File.generated(config, f"tutorials/scripts/{script.name}", content=script.read_bytes()))
        for name in images:
            files.append(File.generated(config, f"tutorials/img/{name}", content=(result / name).read_bytes()))
        if not os.environ.get("FASTFLOW_DOCS_CACHE") == "1":
            shutil.rmtree(result, ignore_errors=True)
    return files
