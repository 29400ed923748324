"""What the processes of a run agree on, so that all take the same path through their
collectives: process 0's reading of the files (`from_process0`), who failed
(`processes_where`), work that process 0 does alone (`on_process0`) and work that each
does on its own files (`everywhere`). A failure that one process meets alone would
otherwise leave the others in their next collective until the CLI's `FailureWatch` ends
them; here every process raises at once, the same error. With one process each is a plain
call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from sparse_vit_jax.errors import UserError

T = TypeVar('T')


def from_process0(value: int) -> int:
    """Process 0's `value` (an int or bool), on every process: a choice read from files (is
    this finished? which run holds the workdir?) must be one choice, or the processes would
    run different programs and hang in their collectives."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def text_from_process0(text: str, size: int = 2048) -> str:
    """Process 0's `text` (its first `size` bytes of UTF-8), on every process."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    data = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(got).rstrip(b'\0').decode(errors='ignore')


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes whose `flag` is true, on every process."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils
    return [int(i) for i in np.flatnonzero(multihost_utils.process_allgather(np.int32(flag)))]


def on_process0(fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 only (the one writer of a shared file); its result there, None on
    the others, which wait for it. If it fails, every process raises: process 0 its own
    exception, the others a UserError with process 0's line."""
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
    why = text_from_process0(text)
    if error is not None:
        raise error
    if why:
        raise UserError(why.splitlines()[0])
    return result


def everywhere(fn: Callable[[], T], elsewhere: Callable[[int], Exception]) -> T:
    """`fn()` on every process (each on its own files: its shards, its copy of the weights).
    If it fails on any, every process raises: its own exception where it failed,
    `elsewhere(the first process that failed)` on the others."""
    error: Exception | None = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
        error = e
    failed = processes_where(error is not None)
    if error is not None:
        raise error
    if failed:
        raise elsewhere(failed[0])
    return result
