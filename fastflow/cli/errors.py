"""The one exception the ``fastflow`` batch commands raise for user errors.

A :class:`CLIError` is a problem the user can fix (bad config key, unreadable file, mismatched
checkpoint, existing output): the command prints its one-line message and exits with status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-fixable error: printed as one line, exit status 2."""


def report(command: str, err: CLIError, rank: int = 0) -> int:
    if rank == 0:
        msg = str(err).replace("\n", " ")
        print(f"fastflow {command}: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_USAGE
