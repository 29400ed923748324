"""Error types for problems the user can fix, and a CLI wrapper that prints them.

Anything raised as `UserError` reaches the terminal as a single line
`error: <what is wrong and what to do>`; everything else is a bug and keeps its
traceback. Exit codes: 0 done, 1 a bug, 2 bad input (`UserError`), 3 stopped by
SIGTERM or SIGINT at a safe point (`Stopped`: re-run the same command to resume).
With several processes, work that process 0 does alone (`on_process0`) ends every
process when it fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar('T')


class UserError(Exception):
    """A problem with the user's input (file, config, data) with a fix in its message."""

    exit_code = 2


class Stopped(UserError):
    """The job stopped on a signal at a safe point; what it owes is saved or redone on re-run."""

    exit_code = 3


def on_process0(fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 only (the one writer of a shared file); its result there, None on
    the others, which wait for it.

    If it fails, every process raises at once: process 0 its own exception, the others a
    UserError with process 0's line. Otherwise they would go on into collectives that
    process 0 never reaches, and end only at the heartbeat timeout, without a word.
    """
    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    if error is None:
        text = ''
    elif isinstance(error, UserError):
        text = str(error) or type(error).__name__
    else:
        text = f'process 0 failed ({type(error).__name__}: {error})'
    why = _text_from_process0(text)
    if error is not None:
        raise error
    if why:
        raise UserError(why.splitlines()[0])
    return result


def _text_from_process0(text: str, size: int = 2048) -> str:
    """Process 0's `text` (its first `size` bytes of UTF-8), on every process."""
    from jax.experimental import multihost_utils
    data = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(got).rstrip(b'\0').decode(errors='ignore')


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
