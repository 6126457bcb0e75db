"""griffe extension (loaded by mkdocstrings, see mkdocs.yml): a fastflow function or class whose
docstring is set at import time (e.g. ``fastflow.ops.lu``'s ops, documented by a decorator that
assigns ``__doc__``) has none in the source that griffe reads; take it from the imported object."""

from __future__ import annotations

import importlib
import inspect

import griffe


class RuntimeDocstrings(griffe.Extension):
    def _fill(self, obj) -> None:
        if obj.docstring is not None or not obj.path.startswith("fastflow."):
            return
        try:
            runtime = importlib.import_module(obj.module.path)
            for part in obj.path[len(obj.module.path) + 1:].split("."):
                runtime = getattr(runtime, part)
        except Exception:  # not importable here: leave the entry bare
            return
        doc = getattr(runtime, "__doc__", None)
        if doc and doc is not getattr(type(runtime), "__doc__", None):
            obj.docstring = griffe.Docstring(inspect.cleandoc(doc), parent=obj)

    def on_function_instance(self, *, func, **kwargs) -> None:
        self._fill(func)
