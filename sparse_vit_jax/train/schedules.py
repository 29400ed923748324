"""Learning-rate and momentum schedules that optax does not have."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _cos(start: float, end: float, pct: jnp.ndarray) -> jnp.ndarray:
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def onecycle(total_steps: int, warmup_steps: int, start: float, peak: float, end: float
             ) -> optax.Schedule:
    """torch OneCycleLR's two-phase cosine: start -> peak (warmup) -> end, by step."""
    up = float(warmup_steps) - 1.0
    down = float(total_steps) - 1.0

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        s = jnp.asarray(step, jnp.float32)
        first = _cos(start, peak, jnp.clip(s / max(up, 1e-9), 0.0, 1.0))
        second = _cos(peak, end, jnp.clip((s - up) / max(down - up, 1e-9), 0.0, 1.0))
        return jnp.where(s <= up, first, second)

    return schedule
