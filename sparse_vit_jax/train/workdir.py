"""A workdir belongs to one run at a time: a lock naming the owner's host and process.

The lock is taken by process 0. On a filesystem it is a file created exclusively: a lock
left by a process that no longer runs on this host is taken over; one held by a live
process, or by another host, is refused with one line (by every process). On an object
store (gs://), which has no exclusive create, it is a lease (`_Lease`): an object written
only if it is absent (or unchanged since read), through tensorstore's conditional writes
(GCS generation preconditions), which process 0 rewrites every `renew_s` while the run
lasts. A lease that is not rewritten while a newcomer watches it for `wait_s` (or that was
last rewritten `stale_s` ago by its own clock, or whose process is gone from this host) is
taken over; one that is rewritten meanwhile is refused with one line. A run whose lease is
taken over all the same (it could not rewrite it for `wait_s`: a stalled host, storage that
failed every write) learns it at its next rewrite, within `renew_s`, and ends at once with
one line, exit 2 (a checkpoint then in flight is dropped, as by a kill); the run's other
processes end with it, each with one line.
With several processes the workdir must be one shared directory (each process writes its
shards of every checkpoint there): the other processes read the lock that process 0 wrote,
or stop with one line.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import from_process0, on_process0, processes_where
from sparse_vit_jax.train.distributed import exit_with_others

LOCK = '.lock'
SHARED = ('with several hosts --workdir must be one shared directory (gs:// or a shared '
          'filesystem), not a local path on each host')
OBJECT_STORES = ('gs://',)


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


def _gone_from_this_host(owner: dict[str, Any]) -> bool:
    try:
        return owner.get('host') == socket.gethostname() and not _alive(int(owner.get('pid', -1)))
    except (TypeError, ValueError):
        return False


def _owner_text(owner: dict[str, Any] | None) -> str:
    owner = owner or {}
    return f'process {owner.get("pid", "?")} on {owner.get("host", "an unknown host")}'


def _renewed(owner: dict[str, Any] | None) -> float:
    """When the lease was last written, by its owner's clock (0.0 if it does not say)."""
    try:
        return float((owner or {}).get('renewed', 0.0))
    except (TypeError, ValueError):
        return 0.0


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


def _lost_exit(line: str) -> None:
    """The default when a lease is taken over: one line and exit 2, at once, from the
    renewing thread (the main thread may be inside a step or a checkpoint write); the run's
    other processes end with it, each with one line (`exit_with_others`)."""
    sys.stdout.flush()
    print(f'error: {line}', file=sys.stderr, flush=True)
    exit_with_others(2, line)


class _Lease:
    """The lock as an object in a tensorstore key-value store, written conditionally."""

    def __init__(self, url: str, log: Callable[[str], Any], renew_s: float, wait_s: float,
                 stale_s: float, on_lost: Callable[[str], None]) -> None:
        import tensorstore as ts
        self.url = url.rstrip('/') + '/'
        self.kv = ts.KvStore.open(self.url).result()
        self.log, self.on_lost = log, on_lost
        self.renew_s, self.wait_s, self.stale_s = renew_s, wait_s, stale_s
        self.generation: bytes | None = None  # ours, while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> tuple[dict[str, Any] | None, bytes, bool]:
        """(owner or None, generation, present)."""
        r = self.kv.read(LOCK).result()
        if r.state != 'value':
            return None, r.stamp.generation, False
        try:
            owner = json.loads(r.value)
        except ValueError:
            owner = None
        return owner if isinstance(owner, dict) else None, r.stamp.generation, True

    def _write(self, me: dict[str, Any], if_equal: bytes) -> bytes:
        """The new generation, or b'' if the lock changed since `if_equal`."""
        body = json.dumps({**me, 'renewed': time.time()})
        return self.kv.write(LOCK, body, if_equal=if_equal).result().generation

    def take(self, me: dict[str, Any], where: str) -> None:
        watched: tuple[bytes, float] | None = None  # (generation, since) of a live-looking lock
        while True:
            owner, generation, present = self.read()
            why = ''
            if present:
                age = time.time() - _renewed(owner)
                if owner is not None and _gone_from_this_host(owner):
                    why = 'its process is gone'
                elif owner is not None and age > self.stale_s:
                    why = f'last renewed {age:.0f} s ago'
                elif watched is None:
                    self.log(f'note: {where} is locked by {_owner_text(owner)}; waiting up to '
                             f'{self.wait_s:.0f} s to see if it renews the lock')
                    watched = (generation, time.monotonic())
                elif watched[0] != generation:
                    raise UserError(f'{where} is in use by {_owner_text(owner)} (it renewed its '
                                    'lock while this run waited); wait for it to end')
                elif time.monotonic() - watched[1] >= self.wait_s:
                    why = f'not renewed in {self.wait_s:.0f} s'
                if not why:
                    time.sleep(min(self.renew_s / 2, 2.0))
                    continue
                self.log(f'note: taking over the lock of {_owner_text(owner)} ({why})')
            new = self._write(me, if_equal=generation)
            if new:
                self.generation = new
                self._thread = threading.Thread(target=self._renew, args=(me, where),
                                                name='WorkdirLease', daemon=True)
                self._thread.start()
                return
            watched = None  # another run wrote it meanwhile: look again

    def _renew(self, me: dict[str, Any], where: str) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                new = self._write(me, if_equal=self.generation)
            except Exception:  # noqa: BLE001 - storage unreachable: try again next time
                continue
            if not new and not self._stop.is_set():
                try:
                    owner = self.read()[0]
                except Exception:  # noqa: BLE001 - say what is known
                    owner = None
                self.on_lost(f'the lock of {where} was taken over by {_owner_text(owner)}, '
                             'which found it not renewed; this run stops: let one run own '
                             'the workdir')
                return
            self.generation = new

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.generation:
            try:  # deleted only if still ours
                self.kv.write(LOCK, None, if_equal=self.generation).result()
            except Exception as e:  # noqa: BLE001 - the run's work is done; the lease expires
                self.log(f'note: could not remove the lock of {self.url} ({type(e).__name__}); '
                         f'the next run takes it over after {self.wait_s:.0f} s')
            self.generation = None


class WorkdirLock:
    """`with WorkdirLock(workdir):` the workdir is this run's (see the module docstring).

    `lease`: the object-store lock (None: for gs:// workdirs); its timings and `on_lost` (the
    action when a lease is taken over: one line and exit 2) are parameters for tests.
    """

    def __init__(self, workdir: Any, log: Any = print, *, lease: bool | None = None,
                 renew_s: float = 10.0, wait_s: float = 60.0, stale_s: float = 900.0,
                 on_lost: Callable[[str], None] = _lost_exit) -> None:
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK
        self.log = log
        self.held = False
        self.token = 0  # process 0's random token in the lock, once entered
        if lease is None:
            lease = str(workdir).startswith(OBJECT_STORES)
        url = str(self.workdir)
        if '://' not in url:  # a local directory (tests): tensorstore's file driver
            url = 'file://' + os.path.abspath(url)
        self._lease = _Lease(url, log, renew_s, wait_s, stale_s, on_lost) if lease else None

    def __enter__(self) -> WorkdirLock:
        # The others wait for the token: process 0's failure to take the lock ends them too.
        token = self.token = from_process0(on_process0(self._take) or 0)  # once written
        blind = processes_where(jax.process_index() != 0
                                and (self._owner() or {}).get('token') != token)
        if blind:  # every process stops now, with the same line
            self.__exit__()
            raise UserError(
                f'process {blind[0]} does not see the lock that process 0 wrote in '
                f'{self.workdir}; {SHARED}')
        return self

    def _me(self) -> dict[str, Any]:
        return {'host': socket.gethostname(), 'pid': os.getpid(),
                'token': secrets.randbelow(2**31 - 1) + 1}

    def _take(self) -> int:
        """Takes the lock; returns the random token written in it."""
        me = self._me()
        if self._lease is not None:
            self._lease.take(me, str(self.workdir))
            self.held = True
            return me['token']
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and time.time() - self._mtime() < 10:
                    owner = {'pid': '?', 'host': 'a process starting now'}
                if owner is None or _gone_from_this_host(owner):
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
        if self._lease is not None:
            return self._lease.read()[0]
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process killed while creating it

    def __exit__(self, *_: Any) -> None:
        if self.held:
            if self._lease is not None:
                self._lease.release()
            else:
                self.path.unlink(missing_ok=True)
            self.held = False
