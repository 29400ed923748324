"""The optimizer: one optax chain built from config.optimizer / schedule / sparsity.

    clip -> [L1 subgradient] -> [coupled weight decay] -> SGD-momentum | AdamW
         -> [L1 proximal]      (all inside inject_hyperparams: lr, momentum logged)
    wrapped by keep_masks (after pruning), keep_zeros (fine-tuning a pruned model) or
    gradual_pruning (while training), and
    MultiSteps (gradient accumulation).

The OneCycle schedule (train.schedules.onecycle) reproduces
torch.optim.lr_scheduler.OneCycleLR (cosine annealing, div_factor 25, final_div_factor
1e4, momentum cycled 0.95 -> 0.85 -> 0.95), which the paper's implementation uses with
its defaults.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.pruning import gradual_pruning, keep_masks, keep_zeros
from sparse_vit_jax.selection import select
from sparse_vit_jax.sparsity import add_l1_penalty, l1_proximal
from sparse_vit_jax.train.schedules import onecycle


def schedules(cfg: Any, total_steps: int) -> tuple[optax.Schedule, optax.Schedule | float]:
    """(learning-rate schedule, momentum schedule or constant)."""
    s, o = cfg.schedule, cfg.optimizer
    warmup = min(s.warmup_steps, max(total_steps - 1, 1))
    if s.name == 'onecycle':
        start = o.lr / s.div_factor
        lr = onecycle(total_steps, warmup, start, o.lr, start / s.final_div_factor)
        mom = (onecycle(total_steps, warmup, s.max_momentum, s.base_momentum, s.max_momentum)
               if s.cycle_momentum else o.momentum)
        return lr, mom
    if s.name == 'warmup_cosine':
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=0.0), o.momentum
    if s.name == 'constant':
        return optax.constant_schedule(o.lr), o.momentum
    raise UserError(f"config.schedule.name must be onecycle, warmup_cosine or constant, "
                    f'got {s.name!r}')


def _l1_strength(cfg: Any, total_steps: int) -> optax.Schedule | float:
    l1 = cfg.sparsity.l1
    if l1.schedule == 'constant':
        return l1.weight
    if l1.schedule == 'linear':  # ramp from 0 to weight over training
        return optax.linear_schedule(0.0, l1.weight, max(total_steps, 1))
    raise UserError(f"config.sparsity.l1.schedule must be 'constant' or 'linear', "
                    f'got {l1.schedule!r}')


def build_optimizer(cfg: Any, total_steps: int, masks: Any = None
                    ) -> optax.GradientTransformation:
    o, l1 = cfg.optimizer, cfg.sparsity.l1
    lr_schedule, mom_schedule = schedules(cfg, total_steps)
    strength = _l1_strength(cfg, total_steps)
    l1_mask = (lambda p: select(p, list(l1.include))) if l1.include else None

    def chain(learning_rate: jnp.ndarray, momentum: jnp.ndarray) -> optax.GradientTransformation:
        parts = []
        if o.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(o.grad_clip))
        if l1.weight > 0 and l1.mode == 'subgradient':
            parts.append(add_l1_penalty(strength, l1_mask))
        if o.name == 'sgd':
            if o.weight_decay_mode == 'coupled' and o.weight_decay > 0:
                parts.append(optax.add_decayed_weights(o.weight_decay))
            parts.append(optax.trace(decay=momentum, nesterov=o.nesterov))
            if o.weight_decay_mode == 'decoupled' and o.weight_decay > 0:
                parts.append(optax.add_decayed_weights(o.weight_decay))
            parts.append(optax.scale_by_learning_rate(learning_rate))
        elif o.name == 'adamw':
            if o.weight_decay_mode == 'coupled' and o.weight_decay > 0:
                parts.append(optax.add_decayed_weights(o.weight_decay))
            parts.append(optax.adamw(learning_rate, b1=o.b1, b2=o.b2, weight_decay=(
                o.weight_decay if o.weight_decay_mode == 'decoupled' else 0.0)))
        else:
            raise UserError(f"config.optimizer.name must be 'sgd' or 'adamw', got {o.name!r}")
        if l1.weight > 0 and l1.mode == 'proximal':
            parts.append(l1_proximal(strength, learning_rate, l1_mask))
        return optax.chain(*parts)

    tx: optax.GradientTransformation = optax.inject_hyperparams(chain)(
        learning_rate=lr_schedule, momentum=mom_schedule)
    g = cfg.sparsity.gradual
    if masks is not None:
        tx = keep_masks(tx, masks)
    elif cfg.sparsity.keep_zeros:  # masks from the weights the state is initialised with
        tx = keep_zeros(tx, select=list(cfg.prune.include) or None)
    elif g.sparsity > 0:  # in optimizer steps 0 .. total_steps - 1, as the state counts them
        last = max(total_steps - 1, 0)
        end = min(round(g.end * total_steps), last)
        tx = gradual_pruning(tx, g.sparsity, start_step=min(round(g.start * total_steps), end),
                             end_step=end, frequency=g.every_steps,
                             select=list(g.include) or None)
    if o.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.accumulate)
    return tx


def current_hparams(opt_state: Any) -> dict[str, jnp.ndarray]:
    """The injected hyperparameters (lr, momentum) wherever they sit in the state."""
    def find(s: Any) -> dict[str, jnp.ndarray] | None:
        if hasattr(s, 'hyperparams') and isinstance(s, tuple):  # InjectHyperparamsState
            return dict(s.hyperparams)
        if isinstance(s, tuple):
            for x in s:
                if (h := find(x)) is not None:
                    return h
        return None
    return find(opt_state) or {}


def steps_for(cfg: Any, steps_per_epoch: int) -> int:
    if cfg.num_steps > 0:
        return cfg.num_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch / max(cfg.optimizer.accumulate, 1))
               * max(cfg.optimizer.accumulate, 1))
