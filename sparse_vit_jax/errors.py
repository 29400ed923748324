"""One error type for problems the user can fix, and a CLI wrapper that prints them.

Anything raised as `UserError` reaches the terminal as a single line
`error: <what is wrong and what to do>` with exit status 2; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's input (file, config, data) with a fix in its message."""


def run_cli(main: Callable[..., Any], *args: Any) -> Any:
    """Runs `main`, turning UserError (and a full disk) into one line and exit 2."""
    try:
        return main(*args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno in (28, 122, 13, 30, 20, 17):  # ENOSPC EDQUOT EACCES EROFS ENOTDIR EEXIST
            print(f'error: cannot write {e.filename or "output"}: {e.strerror}; '
                  'free space or choose a writable directory', file=sys.stderr)
            sys.exit(2)
        raise
