"""``fastflow`` command: a subcommand per module in this package.

Each subcommand module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (taking the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["info", "bench", "fit", "score", "sample", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow",
                                     description="Compiled-kernel normalizing flows: batch jobs and tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"fastflow.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from fastflow.backends import BackendUnavailableError, UnknownBackendError, env_backend
    from fastflow.cli.errors import CLIError, report

    try:
        if args.command != "info":  # info reports a bad FASTFLOW_BACKEND itself
            env_backend()
        return int(args.func(args) or 0)
    except (BackendUnavailableError, UnknownBackendError) as e:  # e.g. --model-arg backend=triton on a CPU
        return report(args.command, CLIError(str(e)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
