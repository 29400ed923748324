"""Checkpoints: one orbax CheckpointManager with its cadence, and restores that never lie.

Each step holds the train state (`StandardSave`) and a JSON `meta` item (the caller's
run description plus the state's layout). Orbax writes a step into a temporary directory
and renames it when complete, so a write interrupted by a kill is never listed. A listed
step that fails to restore (files truncated or deleted afterwards), or whose arrays
differ from the checksums saved with them or hold NaN/inf, is moved to
`<workdir>/damaged_checkpoints/` and the previous step is used. A step whose layout
differs from what the caller now builds (another model or optimizer) is not damaged: it
is left where it is and the run is refused. With several processes, each must list the
same steps, or all stop with one line; each reads only its own shards, so whether any
failed is exchanged before the next step is tried (`read_together`). A state holding
NaN/inf is never saved (`diverged`): a checkpoint that a resume would set aside must not
replace a good one. A write that fails (a full disk, an I/O error) on any process ends
the run at the next save with one line on every process, and removes the partial step
(`FailFastBarrier` ends orbax's closing barriers on all processes at once); the tracebacks
that orbax and tensorstore print about it meanwhile are dropped (`_HeldWriteErrors`).
`restore_params` reads only the parameters of a run, so a finished run can be evaluated
without its data or optimizer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import everywhere, from_process0, on_process0, processes_where
from sparse_vit_jax.train.distributed import FailFastBarrier, ProcessFailed
from sparse_vit_jax.train.sharding import to_host

CKPT_DIR = 'checkpoints'


def absolute(path: Any) -> Any:
    return path if str(path).startswith('gs://') else epath.Path(path).absolute()


def layout(tree: Any) -> str:
    """A fingerprint of a pytree's paths, shapes and dtypes."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = ';'.join(f'{jax.tree_util.keystr(k)}:{tuple(v.shape)}:{v.dtype}' for k, v in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (wider types split, narrower ones widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


@jax.jit
def _sums_and_finite(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    sums = [jnp.sum(_words(x), dtype=jnp.uint32) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return sums, jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def checksums(tree: Any) -> tuple[dict[str, int], bool]:
    """({path: wrap-around sum of the array's 32-bit words}, whether every float is finite).

    Computed on the devices, whatever the sharding; only a few numbers reach the host.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums, finite = to_host(_sums_and_finite([x for _, x in flat]))
    return {jax.tree_util.keystr(p): int(v) for (p, _), v in zip(flat, sums)}, bool(finite)


def diverged(what: str, value: str, step: int, kept: int | None) -> UserError:
    """The error of a run whose `what` became `value` by `step` (`kept`: its newest
    checkpoint, written before)."""
    where = f'the last good checkpoint (step {kept}) is kept' if kept is not None else \
        'no checkpoint was saved'
    return UserError(f'{what} became {value} by step {step}; stopped without saving ({where}); '
                     'lower optimizer.lr or set optimizer.grad_clip')


class Damaged(Exception):
    """A checkpoint that restores but holds other bytes than were saved, or non-finite ones."""


def verify(tree: Any, saved: dict[str, int] | None, prefix: str = '') -> None:
    """Raises Damaged unless `tree` matches the checksums saved with it (keys under `prefix`)."""
    got, finite = checksums(tree)
    if not finite:
        raise Damaged('it holds NaN or infinite values')
    if saved is None:
        return  # written before checksums were stored
    bad = [k for k, v in got.items() if saved.get(prefix + k, v) != v]
    if bad:
        raise Damaged(f'{len(bad)} arrays differ from what was saved (first: {bad[0]})')


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else ''


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def read_together(step_dir: epath.Path, item: str, handler: Any, args: Any) -> Any:
    """One item of a checkpoint step, read by every process at once; each learns whether any
    failed.

    Each process reads only its own shards, so damage may fail one process alone. Orbax's
    `CheckpointManager.restore` ends in a barrier that such a process never reaches: the others
    would wait in it, or pair their next collectives wrongly (a hang). So the item is read by
    its handler (no barrier), and one exchange follows: where any process failed, every
    process raises (the others `Damaged`), and the step is set aside or skipped by all alike.
    """
    def read() -> Any:
        try:
            return handler.restore(absolute(step_dir / item), args=args)
        finally:
            handler.close()

    return everywhere(read, lambda i: Damaged(f'process {i} could not read its part of it'))


def read_meta(step_dir: epath.Path) -> dict[str, Any]:
    return read_together(step_dir, 'meta', ocp.JsonCheckpointHandler(), ocp.args.JsonRestore())


class _HeldWriteErrors(logging.Filter):
    """Holds what orbax and tensorstore print about a failing background write until the
    Checkpointer knows what it was about.

    A write that fails makes each of orbax's threads log it with a traceback, tensorstore's
    callbacks meet the event loops orbax closed ('Event loop is closed', as unraisable
    exceptions) and asyncio logs the futures nobody read: some 300 lines for one full disk,
    before the Checkpointer reports it in one line. So all of that waits here: it is dropped
    when that one line reports the failure, and let through (late, whole) when the writes
    end well or fail otherwise. One per process (`HELD`). After a failure reported in one
    line it drops what the writers say for the rest of the process: the failed write's tasks
    are collected (and logged) at any time up to the exit, and a later failure of a write is
    again one line, of anything else a traceback of ours.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []
        self.dropping = self._read_failed = False
        self.directories: list[str] = []
        self.damaged: list[str] = []  # steps whose failed read was reported in one line
        self._installed = False
        self._hook = sys.unraisablehook

    def install(self, directory: str) -> None:
        """Holds also what names `directory` (tensorstore's errors name the files)."""
        if directory not in self.directories:
            self.directories.append(directory)
        if not self._installed:
            for name in ('absl', 'asyncio'):
                logging.getLogger(name).addFilter(self)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not self._about_writes(record):
            return True
        if not self.dropping and not self._names_damaged(_text(record)):
            self.held.append(record)
        return False

    def _unraisable(self, u: Any) -> None:
        text = str(u.exc_value)
        if not ('Event loop is closed' in text or _through_writers(u.exc_traceback)
                or self._names_a_directory(text)):
            self._hook(u)
        elif not self.dropping and not self._names_damaged(text):
            self.held.append(u)

    def release(self) -> None:
        held, self.held = self.held, []
        for x in held:
            if isinstance(x, logging.LogRecord):
                logging.getLogger(x.name).callHandlers(x)  # past this filter
            else:
                self._hook(x)

    def _names_a_directory(self, text: str) -> bool:
        return any(d in text for d in self.directories)

    def _names_damaged(self, text: str) -> bool:
        """Whether `text` is about a step whose damage was reported (asyncio logs the failed
        read's futures whenever they are collected, after the search too)."""
        return any(d in text for d in self.damaged)

    def _about_writes(self, record: logging.LogRecord) -> bool:
        """Whether orbax logged `record`, or it is about the writers' code or files (asyncio's
        tasks and futures that a failed write left behind)."""
        if record.name == 'absl':
            return _WRITERS[0] in record.pathname
        if record.exc_info and _through_writers(record.exc_info[2]):
            return True
        text = record.getMessage()
        return any(w in text for w in _WRITERS) or self._names_a_directory(text)

    def read_failed(self, step_dir: Any) -> None:
        """Notes that the read of `step_dir` was reported damaged in one line: what names it
        is dropped from now on, and what tensorstore says about it without naming it (its
        callbacks meet the event loops orbax closed), which arrives while later steps are
        read, is dropped by `end_reads`."""
        self._read_failed = True
        self.damaged.append(str(absolute(step_dir)).rstrip('/') + '/')
        self.held = [x for x in self.held if not self._names_damaged(_text(x))]

    def end_reads(self) -> None:
        """Ends a search for a usable step: drops what is held if a read failed (its warning
        line said it), else lets it through."""
        if self._read_failed:
            self.held = []
        else:
            self.release()
        self._read_failed = False

    def drop(self) -> None:
        """Drops what is held and what the writers' threads still say about the failure
        (also the coroutines of the failed write that are collected unawaited at exit)."""
        self.held, self.dropping = [], True
        warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)


_WRITERS = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorstore{os.sep}')  # their code


def _text(held: Any) -> str:
    """A held log record's or unraisable exception's message and error."""
    if isinstance(held, logging.LogRecord):
        return f'{held.getMessage()} {held.exc_info[1] if held.exc_info else None}'
    return str(held.exc_value)


def _through_writers(tb: Any) -> bool:
    return any(w in f.filename for f in traceback.extract_tb(tb) for w in _WRITERS)


HELD = _HeldWriteErrors()


class Checkpointer:
    """Saves every `every_steps` (or when forced), keeps the newest `keep`; with several
    processes, a save that one of them has not finished within `timeout_s` (its storage hangs)
    ends on every process with one line."""

    def __init__(self, workdir: Any, *, every_steps: int, keep: int,
                 log: Callable[[str], None] = _say, timeout_s: int = 1200) -> None:
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CKPT_DIR
        self.log = log
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        # With several processes, a write failing on one of them ends the save on all at once.
        self._barrier = FailFastBarrier('checkpoints') if jax.process_count() > 1 else None
        self.manager = ocp.CheckpointManager(
            absolute(self.directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, save_decision_policy=policy,
                cleanup_tmp_directories=True,
                async_options=ocp.AsyncOptions(timeout_secs=int(timeout_s),
                                               barrier_sync_fn=self._barrier)))
        self._bytes = 0
        self._failed = False
        HELD.install(str(absolute(self.directory)))

    def save(self, state: Any, meta: dict[str, Any], *, step: int | None = None,
             force: bool = False) -> bool:
        """Saves `state` at its step if the cadence (or `force`) says so; returns whether.
        `step` (= state.step) spares a loop reading the step back from the device."""
        step = int(state.step) if step is None else step
        if not force and not self.manager.should_save(step):
            return False
        sums, finite = checksums(state)
        if not finite:  # never a checkpoint that a resume would refuse, in place of a good one
            raise diverged('the train state', 'NaN or inf', step, self.manager.latest_step())
        meta = {**meta, 'step': step, 'layout': layout(state),
                'params_layout': layout(state.params), 'checksums': sums}
        self._bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        with self._write_errors():
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """A write that fails (a full disk, a quota, an I/O error, on any process) -> one line
        on every process; no partial step. Orbax's background write surfaces its error at the
        next save or wait."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax wraps the OSError in its own errors
            if self._barrier is not None:
                self._barrier.fail(e)  # the others stop at their next barrier, not in 20 min
            full = _is_disk_full(e) and _cause(e, ProcessFailed) is None  # this process's disk
            reason = _write_failure(e)
            if reason is None and not full:
                HELD.release()
                raise
            HELD.drop()  # the line below says it
            self._failed = True  # close() removes what orbax's threads write after this
            if jax.process_index() == 0:  # orbax lists only finished steps; drop the rest
                self._remove_partial_steps()
            steps = ocp.utils.checkpoint_steps(absolute(self.directory))
            kept = (f'the newest complete checkpoint is step {max(steps)}' if steps else
                    'no checkpoint is complete yet')
            if full:
                free = _free_bytes(self.directory)
                raise UserError(
                    f'no space left on the device of {self.directory} while saving a checkpoint '
                    f'(it needs about {self._bytes / 2**20:.1f} MiB of arrays plus metadata per '
                    f'step; {free / 2**20:.1f} MiB free; {kept}); free space and re-run the '
                    'same command to resume') from None
            raise UserError(f'could not write a checkpoint to {self.directory} ({reason}); '
                            f'{kept}; fix that and re-run the same command to resume') from None

    def _remove_partial_steps(self, patience_s: float = 10.0) -> None:
        """Removes orbax's temporary step directories. Its writer threads may still be
        finishing a file in one when the error surfaces, so removal is retried until none
        is left (for at most `patience_s`)."""
        deadline = time.monotonic() + patience_s
        while True:
            for tmp in self.directory.glob('*.orbax-checkpoint-tmp*'):
                shutil.rmtree(tmp, ignore_errors=True)
            if not any(self.directory.glob('*.orbax-checkpoint-tmp*')):
                return
            if time.monotonic() > deadline:
                self.log(f'warning: could not remove the partial checkpoint in {self.directory}')
                return
            time.sleep(0.2)

    def restore_latest(self, target: Any,
                       check_meta: Callable[[dict[str, Any]], None] | None = None
                       ) -> tuple[Any, dict[str, Any]] | None:
        """(state, meta) of the newest usable step, restored onto `target` (ShapeDtypeStructs
        with shardings).

        None when there is no checkpoint; UserError when there are some but none is usable,
        or when they hold another layout than `target`, or when `check_meta` (called with
        the step's meta before anything is restored) refuses it.
        """
        try:
            return self._restore_latest(target, check_meta)
        finally:
            HELD.end_reads()

    def _restore_latest(self, target: Any, check_meta: Any) -> Any:
        steps = same_steps_everywhere(self.directory, self.manager.all_steps())
        want = layout(target)
        for step in steps:
            try:
                meta = read_meta(self.directory / str(step))
                if check_meta is not None:
                    check_meta(meta)
                if meta.get('layout', want) != want:
                    raise UserError(
                        f'{self.directory / str(step)} holds a different model or optimizer '
                        'layout than this config builds; re-run with the config that wrote it, '
                        'or use a new --workdir')
                state = read_together(self.directory / str(step), 'state',
                                      ocp.StandardCheckpointHandler(),
                                      ocp.args.StandardRestore(target))
                verify(state, meta.get('checksums'))
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                self._set_aside(step, e)
                continue
            self.log(f'resuming from {self.directory} at step {step}')
            return state, meta
        if steps:
            raise UserError(f'no usable checkpoint in {self.directory} (all {len(steps)} '
                            f'damaged, moved to {self.workdir / "damaged_checkpoints"}); '
                            're-run to start over')
        return None

    def _set_aside(self, step: int, e: BaseException) -> None:
        aside = self.workdir / 'damaged_checkpoints' / f'{step}-{int(time.time())}'
        self.log(f'warning: checkpoint {self.directory / str(step)} is damaged '
                 f'({type(e).__name__}: {_first_line(e)}); moved to {aside}, trying the '
                 'previous one')
        HELD.read_failed(self.directory / str(step))

        def move() -> None:
            aside.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)

        on_process0(move)  # the others list the steps again only once it has moved
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        with self._write_errors():
            self.manager.wait_until_finished()
        HELD.release()  # every write ended well: what was said is not about a failed one

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()  # joins orbax's threads
            except Exception:  # noqa: BLE001 - after a failed write, the one line is said already
                if not self._failed:
                    raise
            finally:
                HELD.release()
            if self._failed and jax.process_index() == 0:
                self._remove_partial_steps()


def same_steps_everywhere(directory: Any, steps: Any) -> list[int]:
    """`steps`, newest first. Every process must try the same steps in the same order (each
    read ends in an exchange between them, `read_together`): a process whose listing differs
    from process 0's (a stale view of a shared filesystem) stops every process with one line,
    instead of a hang or processes at different steps."""
    steps = sorted(steps, reverse=True)
    mine = zlib.crc32(json.dumps(steps).encode()) & 0x7FFFFFFF
    odd = processes_where(mine != from_process0(mine))
    if odd:
        raise UserError(f'process {odd[0]} lists other checkpoints in {directory} than process 0 '
                        f'({len(steps)} steps here, newest {steps[:1]}); re-run when every host '
                        'sees the same files')
    return steps


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and its causes (or contexts), newest first; at most 20."""
    for _ in range(20):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def _cause(e: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `e`'s chain."""
    return next((x for x in _chain(e) if isinstance(x, kind)), None)


def _write_failure(e: BaseException) -> str | None:
    """Why a checkpoint write failed, when it is the storage's doing (or another process's
    failure); None for anything else (a bug keeps its traceback)."""
    other = _cause(e, ProcessFailed)
    if other is not None:
        return f'process {other.process}: {_os_reason(other.error) or other.error[:200]}'
    own = _cause(e, OSError)
    if own is not None:
        return f'{type(own).__name__}: {_first_line(own)}'
    return _os_reason(str(e))


def _os_reason(text: str) -> str | None:
    """The OS's reason at the end of a tensorstore error ('... "path": Failed to write 256292
    bytes to file 24: File too large [os_error_code='27']'), without the long paths."""
    text = text.splitlines()[0] if text else ''
    if 'os_error_code' not in text:
        return None
    return text.rsplit('": ', 1)[-1][-200:]


def _is_disk_full(e: BaseException | None) -> bool:
    return any((isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
               or 'No space left on device' in str(x) or 'ENOSPC' in str(x) for x in _chain(e))


def _free_bytes(path: Any) -> int:
    try:
        return shutil.disk_usage(str(path)).free
    except OSError:
        return 0


def checkpoint_dir(path: Any) -> epath.Path:
    """A run directory or its checkpoints/ directory -> the checkpoints/ directory."""
    path = epath.Path(path)
    return path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path


def _newest_usable(path: Any, read: Callable[[int, epath.Path], Any],
                   log: Callable[[str], None]) -> Any:
    """`read(step, checkpoints_directory)` of the newest step of a run directory where it
    succeeds: a damaged step is reported and the previous one is tried; nothing is moved (the
    run may belong to someone else). A UserError from `read` ends the search."""
    d = checkpoint_dir(path)
    steps = same_steps_everywhere(d, ocp.utils.checkpoint_steps(absolute(d)))  # finished ones
    if not steps:
        raise UserError(f'no checkpoint found in {d}; pass a run directory or a .npz')
    HELD.install(str(absolute(d)))  # tensorstore's tracebacks about a damaged step's read
    try:
        for step in steps:
            try:
                return read(step, d)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                HELD.read_failed(d / str(step))
                log(f'warning: checkpoint {d / str(step)} is damaged ({type(e).__name__}: '
                    f'{_first_line(e)}); trying the previous one')
        raise UserError(f'no usable checkpoint in {d} (all {len(steps)} damaged)')
    finally:
        HELD.end_reads()


def latest_meta(path: Any, log: Callable[[str], None] = _say) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the newest checkpoint under a run directory whose meta reads."""
    return _newest_usable(path, lambda step, d: (step, read_meta(d / str(step))), log)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of a pytree's leaves."""
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path):
            tuple(v.shape) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_difference(step_dir: Any, params: Any) -> str:
    """': <path> has shape S there, T in the config's model' for the first parameter (sorted)
    whose shape differs between a checkpoint's parameters (its metadata: no array is read)
    and `params`; '' where the metadata does not read."""
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(absolute(step_dir / 'state'))
        saved = _shapes(getattr(saved, 'tree', saved)['params'])
    except Exception:  # noqa: BLE001 - orbax raises many kinds; the line stands without it
        return ''
    want = _shapes(params)
    for k in sorted(saved.keys() | want.keys()):
        if saved.get(k) != want.get(k):
            there, here = (f'shape {x}' if x is not None else 'absent'
                           for x in (saved.get(k), want.get(k)))
            return f': {k} has {there} there, {here} in the config\'s model'
    return ''


def restore_params(path: Any, target: Any, log: Callable[[str], None] = _say) -> Any:
    """Only the parameters of a run's newest usable checkpoint, onto `target`'s shardings.

    `target`: the parameters' ShapeDtypeStructs (with shardings). Neither the
    run's data nor its optimizer is needed.
    """
    item = {'params': target}
    want = layout(target)

    def read(step: int, d: epath.Path) -> Any:
        meta = read_meta(d / str(step))
        if meta.get('params_layout', want) != want:
            raise UserError(f'checkpoint {d / str(step)} holds a different model than the '
                            f'config asks for{_first_difference(d / str(step), target)}')
        state = read_together(d / str(step), 'state', ocp.PyTreeCheckpointHandler(),
                              ocp.args.PyTreeRestore(
                                  item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
        verify(state['params'], meta.get('checksums'), prefix='.params')
        return state['params']

    return _newest_usable(path, read, log)
