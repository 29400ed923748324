"""The train state pytree and its shardings, shaped before anything is allocated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # micro-steps taken; also the data position
    params: Any
    opt_state: Any
    rng: jax.Array        # raw uint32 key data, so orbax stores it as a plain array


InitParams = Callable[[jax.Array], Any]  # rng -> params


def _init(init_params: InitParams, tx: optax.GradientTransformation, key: jax.Array
          ) -> TrainState:
    init_rng, rng = jax.random.split(key)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)


def abstract_state(init_params: InitParams, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (jax.eval_shape: nothing allocated)."""
    return jax.eval_shape(lambda: _init(init_params, tx, jax.random.PRNGKey(0)))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (orbax restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def create_state(init_params: InitParams, tx: optax.GradientTransformation, seed: int,
                 shardings: TrainState, params: Any = None) -> TrainState:
    """A fresh state, initialised directly on its shardings; `params` replace the init's."""
    init = jax.jit(lambda key: _init(init_params, tx, key), out_shardings=shardings)
    state = init(jax.random.PRNGKey(seed))
    if params is not None:
        params = jax.device_put(params, shardings.params)
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        state = state.replace(params=params, opt_state=opt_state)
    return state
