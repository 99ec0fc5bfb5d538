"""One rule for every command line: what went wrong is one line, and the exit code says whose.

- 0: done;
- 2: a user mistake (a bad flag or setting, a missing file or folder, unusable data): ``UserError``;
- 1: a failure at run time (an export that fails its parity check, a server that cannot start):
  ``Failure``, or any unexpected exception (which keeps its traceback, since it is a bug);
- 130: interrupted with Ctrl-C.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A mistake the user can fix, reported as one line without a traceback (exit code 2)."""

    exit_code = EXIT_USER_ERROR


class Failure(Exception):
    """Work that could not be completed, reported as one line without a traceback (exit code 1)."""

    exit_code = EXIT_FAILURE


def run_cli(main: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Call a CLI's ``main`` and turn its errors into the project's one line and exit code."""
    try:
        return main() or EXIT_OK
    except (UserError, Failure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
