"""A workdir belongs to one run at a time: a lock file naming the owner's host and process.

The lock is taken by process 0. A lock left by a process that no longer runs on
this host is taken over; one held by a live process, or by another host, is
refused with one line (by every process). On object stores (gs://) there is no
atomic create: no lock is taken there. With several processes the workdir must be
one shared directory (each process writes its shards of every checkpoint there):
the other processes read the lock that process 0 wrote, or stop with one line.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Any

import jax
from etils import epath

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import from_process0, on_process0, processes_where

LOCK = '.lock'
SHARED = ('with several hosts --workdir must be one shared directory (gs:// or a shared '
          'filesystem), not a local path on each host')


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_workdir(workdir: Any) -> epath.Path:
    """The workdir as a path, or a UserError if it is a file or cannot be reached (a gs://
    bucket with no network, no credentials or no such bucket): before anything is computed."""
    path = epath.Path(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f'--workdir {workdir} is a file; choose a directory')
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every filesystem backend has its own errors
        text = ' '.join(str(e).split()) or type(e).__name__
        raise UserError(f'cannot reach --workdir {workdir} ({text[:240]}); check the path, the '
                        'bucket name, your credentials (gcloud auth application-default login) '
                        'and the network') from None
    return path


class WorkdirLock:
    def __init__(self, workdir: Any, log: Any = print) -> None:
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK
        self.log = log
        self.held = False

    def __enter__(self) -> WorkdirLock:
        if str(self.workdir).startswith('gs://'):
            return self
        # The others wait for the token: process 0's failure to take the lock ends them too.
        token = from_process0(on_process0(self._take) or 0)  # once written
        blind = processes_where(jax.process_index() != 0
                                and (self._owner() or {}).get('token') != token)
        if blind:  # every process stops now, with the same line
            self.__exit__()
            raise UserError(
                f'process {blind[0]} does not see the lock that process 0 wrote in '
                f'{self.workdir}; {SHARED}')
        return self

    def _take(self) -> int:
        """Creates the lock file; returns the random token written in it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = {'host': socket.gethostname(), 'pid': os.getpid(),
              'token': secrets.randbelow(2**31 - 1) + 1}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and time.time() - self._mtime() < 10:
                    owner = {'pid': '?', 'host': 'a process starting now'}
                if owner is None or (owner.get('host') == me['host']
                                     and not _alive(int(owner.get('pid', -1)))):
                    self.log(f'note: taking over the lock of a process that is gone ({owner})')
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f'{self.workdir} is in use by process {owner.get("pid")} on '
                    f'{owner.get("host")}; wait for it to end, or delete {self.path} if it '
                    'is gone') from None
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self.held = True
            return me['token']
        raise UserError(f'could not take the lock {self.path}; delete it and re-run')

    def _mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process killed while creating it

    def __exit__(self, *_: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
