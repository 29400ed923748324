"""Error types for problems the user can fix, and a CLI wrapper that prints them.

Anything raised as `UserError` reaches the terminal as a single line
`error: <what is wrong and what to do>`; everything else is a bug and keeps its
traceback. Exit codes: 0 done, 1 a bug, 2 bad input (`UserError`), 3 stopped by
SIGTERM or SIGINT at a safe point (`Stopped`: re-run the same command to resume).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's input (file, config, data) with a fix in its message."""

    exit_code = 2


class Stopped(UserError):
    """The job stopped on a signal at a safe point; what it owes is saved or redone on re-run."""

    exit_code = 3


def run_cli(main: Callable[..., Any], *args: Any) -> Any:
    """Runs `main`, turning UserError (and a full disk) into one line and exit 2."""
    try:
        return main(*args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno in (28, 122, 13, 30, 20, 17):  # ENOSPC EDQUOT EACCES EROFS ENOTDIR EEXIST
            print(f'error: cannot write {e.filename or "output"}: {e.strerror}; '
                  'free space or choose a writable directory', file=sys.stderr)
            sys.exit(2)
        raise
