"""MkDocs hook: the API reference, generated from the package's ``__all__`` lists.

For each documented package, one index page (the package docstring and a table of every public
name, each linking to its entry) and one page per public submodule, whose ``__all__`` names are
rendered by mkdocstrings from their docstrings. The lists are read statically with griffe (the
same loader mkdocstrings uses), so a name added to an ``__all__`` gets its entry without editing
the docs, and a name whose docstring is missing still gets a (bare) entry. The nav placeholder
``api/index.md`` in mkdocs.yml is expanded into the generated pages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import griffe
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.api")
ROOT = Path(__file__).resolve().parents[2]

# package -> extra objects from private modules that belong on its index page
PACKAGES = {
    "fastflow.ops": ["fastflow.ops._dispatch.HigherOrderError"],
    "fastflow.nn": [],
    "fastflow.flows": [],
    "fastflow.data": [],
    "fastflow.integrations": ["fastflow.integrations._patch.Handle",
                              "fastflow.integrations._patch.UntestedVersionWarning"],
    "fastflow.backends": [],
}

_pages: dict[str, str] = {}
_nav: list = []


def _summary(obj) -> str:
    doc = obj.docstring.value.strip() if obj.docstring else ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|") if doc else ""


def _public_names(module) -> list[str]:
    exports = module.exports
    if exports is None:
        return [n for n, m in module.members.items() if not n.startswith("_") and not m.is_module]
    return [e if isinstance(e, str) else e.name for e in exports]


def _entry(path: str) -> str:
    return f"::: {path}\n    options:\n      heading_level: 2\n"


def _generate() -> None:
    pkg_root = griffe.load("fastflow", search_paths=[str(ROOT)], resolve_aliases=True,
                           resolve_external=False, docstring_parser="google")
    _pages.clear()
    _nav.clear()
    overview = ["# API reference", "",
                "Every public name of fastflow, generated from its docstring. The top-level "
                "`fastflow` package re-exports the ops, `Flow` and `build`.", "",
                "| package | what it holds |", "| --- | --- |"]
    for pkg_path, extras in PACKAGES.items():
        pkg = pkg_root[pkg_path.split(".", 1)[1]]
        slug = pkg_path.split(".", 1)[1]
        subs = [m for n, m in pkg.members.items() if not m.is_alias and m.is_module and not n.startswith("_")]
        rows, own, nav = [], [], [f"api/{slug}/index.md"] if subs else []
        for sub in subs:
            names = _public_names(sub)
            page = f"api/{slug}/{sub.name}.md"
            body = [f"# `{sub.path}`", "", sub.docstring.value if sub.docstring else "", ""]
            if sub.path.startswith("fastflow.integrations."):
                body.append(f"::: {sub.path}\n    options:\n      show_root_heading: false\n      heading_level: 2\n")
                rows.append(f"| [`{sub.path}`][{sub.path}] | {_summary(sub)} |")
            else:
                for name in names:
                    body.append(_entry(f"{sub.path}.{name}"))
                    rows.append(f"| [`{name}`][{sub.path}.{name}] | {_summary(sub[name])} |")
            _pages[page] = "\n".join(body)
            nav.append({sub.name: page})
        # names defined in the package itself (fastflow.data, fastflow.backends) and re-exports from
        # private modules; re-exports of names documented on a submodule page are only listed
        documented = {p.rsplit("/", 1)[-1][:-3] for p in (list(n.values())[0] for n in nav[1:])}
        for name in _public_names(pkg):
            member = pkg[name]
            if not member.is_alias and member.is_module:
                continue
            target = member.target if member.is_alias else member
            parent = target.parent.path if target.parent else ""
            if parent.startswith(pkg_path + ".") and parent.rsplit(".", 1)[-1] in documented:
                continue
            if parent.startswith("fastflow.") and parent != pkg_path and not parent.rsplit(".", 1)[-1].startswith("_"):
                rows.append(f"| [`{name}`][{target.path}] | {_summary(target)} |")  # documented elsewhere
                continue
            own.append(target.path)
        own = list(dict.fromkeys(own + extras))
        for path in own:
            rows.append(f"| [`{path.rsplit('.', 1)[-1]}`][{path}] | {_summary(pkg_root[path.split('.', 1)[1]])} |")
        index = [f"# `{pkg_path}`", "", pkg.docstring.value if pkg.docstring else "", "",
                 "| name | summary |", "| --- | --- |", *rows, ""]
        index += [_entry(p) for p in own]
        index_page = f"api/{slug}/index.md" if subs else f"api/{slug}.md"
        _pages[index_page] = "\n".join(index)
        _nav.append({pkg_path: nav if subs else index_page})
        overview.append(f"| [`{pkg_path}`]({index_page.removeprefix('api/')}) | {_summary(pkg)} |")
    _pages["api/index.md"] = "\n".join(overview) + "\n"


def on_config(config):
    _generate()

    def expand(items):
        out = []
        for item in items:
            if isinstance(item, dict):
                (title, value), = item.items()
                if value == "api/index.md":
                    out.append({title: ["api/index.md", *_nav]})
                    continue
                if isinstance(value, list):
                    out.append({title: expand(value)})
                    continue
            out.append(item)
        return out

    config["nav"] = expand(config["nav"])
    return config


def on_files(files, config):
    for uri, text in _pages.items():
        files.append(File.generated(config, uri, content=text))
    return files
