"""MkDocs hook: the command-line reference (cli.md), generated from ``fastflow.cli.main.build_parser()``.

Each subcommand gets a section with its usage and help text exactly as ``fastflow COMMAND --help``
prints it, and a table of its options, so the page cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os

from mkdocs.structure.files import File


def _table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | help |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        default = action.default
        shown = "" if default in (None, argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction) \
            and default is False else f"`{default!r}`"
        helptext = (action.help or "").replace("%(default)s", str(default)).replace("%%", "%")
        helptext = " ".join(helptext.split()).replace("|", "\\|").replace("*", "\\*")
        rows.append(f"| {name} | {shown} | {helptext} |")
    return rows


def _page() -> str:
    from fastflow.cli.main import build_parser

    os.environ.setdefault("COLUMNS", "100")  # argparse wraps help to the terminal width
    parser = build_parser()
    out = ["# Command line", "",
           "The `fastflow` command (also `python -m fastflow`). This page is generated from the argparse "
           "parser at build time: the blocks below are what `fastflow COMMAND --help` prints.", "",
           "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"## `fastflow {name}`", "", "```text", p.format_help().rstrip(), "```", "", *_table(p), ""]
    return "\n".join(out)


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=_page()))
    return files
