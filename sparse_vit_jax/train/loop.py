"""The training loop: steps, clu metrics and progress, checkpoints, stop on request or NaN.

The loop knows nothing of the model or the objective: it runs a step function over
batches, merges the step's `clu.metrics.Collection` on the device, and at each log
boundary brings the metrics to the host once (the only host synchronisation), checks
them, prints a progress line and writes them through a clu `MetricWriter` (any object
with `write_scalars(step, dict)`). Checkpoints follow the `Checkpointer`'s cadence and
the last step. With `cfg.eval_every`, an `evaluate(state)` given by the caller runs at
every such step before the last (whose evaluation is the caller's), after that step's
checkpoint; its scalars are logged and written under `cfg.eval_name` ('eval/'), and its
time is left out of images/s and the ETA. A stop signal (`train.signals`) stops at the next
step with a checkpoint; on several hosts orbax's preemption sync point makes every host stop
at the same step (a loop without a checkpointer: at the next log step). Before the first
step the loop compiles the step for the first batch and checks that what it allocates fits
the devices (`train.memory`): one line with `cfg.memory_advice` if not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax

from sparse_vit_jax.errors import Stopped
from sparse_vit_jax.train import signals
from sparse_vit_jax.train.checkpointing import Checkpointer, diverged
from sparse_vit_jax.train.memory import check_step_fits
from sparse_vit_jax.train.sharding import to_host
from sparse_vit_jax.train.state import TrainState


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def format_eta(seconds: float) -> str:
    """HH:MM:SS, with a day count in front past 24 hours ('2d 03:04:05')."""
    days, rest = divmod(int(max(seconds, 0)), 86_400)
    clock = time.strftime('%H:%M:%S', time.gmtime(rest))
    return f'{days}d {clock}' if days else clock


@dataclass
class LoopConfig:
    total_steps: int
    log_every: int
    batch_size: int                       # global, for images/s
    meta: dict[str, Any] = field(default_factory=dict)   # stored with every checkpoint
    memory_advice: str = ('lower the batch size (accumulating gradients over several steps '
                          'keeps the effective batch), rematerialise, or shard the state')
    eval_every: int = 0                   # steps between evaluations (0: none in the loop)
    eval_name: str = 'eval'               # their log lines' and tensorboard scalars' name


def train_loop(state: TrainState, step_fn: Callable[[TrainState, Any], tuple[TrainState, Any]],
               batches: Iterator[Any], cfg: LoopConfig, checkpointer: Checkpointer | None = None,
               writer: Any = None,
               extra_scalars: Callable[[TrainState], dict[str, float]] | None = None,
               evaluate: Callable[[TrainState], dict[str, float]] | None = None,
               ) -> tuple[TrainState, dict[str, float]]:
    """Steps `state` to `cfg.total_steps`; returns it and the last logged scalars.

    Checkpoints carry `cfg.meta` and the last logged scalars under 'scalars'.
    """
    step = int(state.step)
    progress = _progress(cfg, writer)
    acc, last = None, {}
    t_last, steps_last = None, 0
    while step < cfg.total_steps:
        batch = next(batches)
        if t_last is None:
            check_step_fits(step_fn, state, batch, advice=cfg.memory_advice)
        state, m = step_fn(state, batch)
        step += 1
        acc = m if acc is None else acc.merge(m)
        if t_last is None:  # rates and ETA leave out the first step (compilation)
            jax.block_until_ready(state.step)
            t_last = time.monotonic()
        else:
            steps_last += 1
        if progress is not None:
            progress(step)
        final = step == cfg.total_steps
        at_log = step % cfg.log_every == 0 or final
        stopping = _stop_requested(step, at_log, checkpointer)
        if at_log or stopping:
            last = _report(step, state, acc, steps_last, t_last, cfg, checkpointer, writer,
                           extra_scalars)
            acc, t_last, steps_last = None, time.monotonic(), 0
        if checkpointer is not None:
            checkpointer.save(state, {**cfg.meta, 'scalars': last}, step=step,
                              force=final or stopping)
        if stopping:
            if checkpointer is not None:
                checkpointer.wait()
            by = signals.received() or signals.ELSEWHERE
            saved = 'checkpoint saved' if checkpointer is not None else \
                'not checkpointed: a re-run redoes these steps'
            raise Stopped(f'stopped by {by} at step {step}; {saved}, re-run the same command '
                          'to resume')
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and not final:
            t_eval = time.monotonic()
            _report_eval(step, evaluate(state), cfg, writer)
            t_last += time.monotonic() - t_eval
    if writer is not None:
        writer.flush()
    return state, last


def _stop_requested(step: int, at_log: bool, checkpointer: Checkpointer | None) -> bool:
    """A stop signal in this process; with several processes, the step all of them agreed on
    (JAX's preemption sync point), since saving is collective, or, for a loop without
    checkpoints, the first log step after any process got one (an exchange between them)."""
    if jax.process_count() == 1:
        return signals.received() is not None
    if checkpointer is not None:
        return checkpointer.reached_preemption(step)
    return at_log and signals.requested()


def _progress(cfg: LoopConfig, writer: Any) -> Any:
    """clu's ReportProgress (steps/s and uptime to the writer) when there is a writer.

    clu's writers and periodic actions import TensorFlow, so a loop without a
    writer (synthetic batches on a machine without TensorFlow) does without them.
    """
    if writer is None:
        return None
    from clu import periodic_actions
    return periodic_actions.ReportProgress(num_train_steps=cfg.total_steps, writer=writer,
                                           every_steps=cfg.log_every, every_secs=None)


def _report(step: int, state: TrainState, acc: Any, steps: int, t0: float, cfg: LoopConfig,
            checkpointer: Checkpointer | None, writer: Any, extra: Any) -> dict[str, float]:
    scalars = {k: float(v) for k, v in to_host(acc.compute()).items()}
    bad = [k for k in ('loss', 'grad_norm') if k in scalars and not math.isfinite(scalars[k])]
    if bad:
        kept = checkpointer.manager.latest_step() if checkpointer is not None else None
        raise diverged(bad[0], str(scalars[bad[0]]), step, kept)
    dt = max(time.monotonic() - t0, 1e-9)
    if steps:
        scalars['images_per_s'] = steps * cfg.batch_size / dt
    if extra is not None:
        scalars.update(extra(state))
    eta = format_eta((cfg.total_steps - step) * dt / steps) if steps else '--:--:--'
    parts = [f'step {step}/{cfg.total_steps}']
    parts += [f'{k} {scalars[k]:.4f}' for k in ('loss',) if k in scalars]
    parts += [f'acc {scalars["accuracy"]:.3f}'] if 'accuracy' in scalars else []
    parts += [f'{scalars["images_per_s"]:.0f} img/s'] if steps else []
    parts += [f'lr {scalars["learning_rate"]:.2e}'] if 'learning_rate' in scalars else []
    log(' | '.join([*parts, f'ETA {eta}']))
    if writer is not None:
        writer.write_scalars(step, scalars)
    return scalars


def _report_eval(step: int, scalars: dict[str, float], cfg: LoopConfig, writer: Any) -> None:
    log(' | '.join([f'{cfg.eval_name} at step {step}/{cfg.total_steps}',
                    *(f'{k} {v:.4f}' for k, v in scalars.items())]))
    if writer is not None:
        writer.write_scalars(step, {f'{cfg.eval_name}/{k}': v for k, v in scalars.items()})
