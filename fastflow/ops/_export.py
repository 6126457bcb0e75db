"""Loading programs exported with ``torch.export`` from fastflow models (docs: "Deploying a model").

An exported fastflow model is a graph of aten ops and ``fastflow::`` custom ops; running it needs
the custom ops registered, which ``import fastflow.ops`` does (no model classes are imported).
:func:`load_exported` is ``torch.export.load`` with that import done and a clear error for a
program that calls an op this installation does not have.
"""

from __future__ import annotations

import os
import re
import zipfile

import torch

__all__ = ["load_exported", "MISSING_OPS_HINT"]

MISSING_OPS_HINT = ("this program calls fastflow's custom ops (fastflow::...); `import fastflow.ops` before "
                    "torch.export.load (or load it with fastflow.ops.load_exported(path)), with the same or a later "
                    "fastflow installed")


def _fastflow_ops_in(path) -> set[str]:
    """The ``fastflow::`` op names a saved program's graphs call (read from the archive's JSON)."""
    names: set[str] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".json"):
                    text = archive.read(member).decode("utf-8", "replace")
                    names.update(re.findall(r"torch\.ops\.fastflow\.([A-Za-z0-9_]+)", text))
    except (OSError, zipfile.BadZipFile):
        pass
    return names


def load_exported(path: str | os.PathLike, **kwargs) -> torch.export.ExportedProgram:
    """``torch.export.load(path)`` for a program exported from a fastflow model (``fastflow export``
    or ``torch.export.save``). Importing this function already registered fastflow's custom ops.

    Returns:
        the ``ExportedProgram``; ``program.module()(x)`` runs it.

    Raises:
        RuntimeError: the program calls a ``fastflow::`` op this fastflow does not define (saved by
            a newer fastflow), naming the ops and what to do.
    """
    try:
        return torch.export.load(path, **kwargs)
    except Exception as exc:
        # torch.export.load logs the deserialisation error and raises a generic one: name the ops
        missing = sorted(n for n in _fastflow_ops_in(path) if not hasattr(torch.ops.fastflow, n))
        if missing or "fastflow" in str(exc):
            ops = ", ".join(f"fastflow::{n}" for n in missing) or "a fastflow op"
            raise RuntimeError(f"cannot load {os.fspath(path)!r}: it calls {ops}, which this installation does "
                               f"not define; {MISSING_OPS_HINT}") from exc
        raise
