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
    """A fresh state, initialised directly on its shardings. Given `params`, only the optimizer
    state is initialised for them (the step and rng are those of the same seed's init); arrays
    of `params` already on their shardings become the state's own, which a step donates."""
    key = jax.random.PRNGKey(seed)
    if params is None:
        return jit_lifting_constants(lambda k: _init(init_params, tx, k), shardings)(key)
    params = jax.device_put(params, shardings.params)
    opt_state = jit_lifting_constants(tx.init, shardings.opt_state)(params)
    step, rng = jax.jit(lambda k: (jnp.zeros([], jnp.int32), jax.random.split(k)[1]),
                        out_shardings=(shardings.step, shardings.rng))(key)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def lower_state(init_params: InitParams, tx: optax.GradientTransformation, seed: int,
                shardings: TrainState) -> tuple[jax.stages.Lowered, tuple[Any, ...]]:
    """`create_state`'s program, lowered, with the arguments it takes: for a caller that
    compiles it ahead, beside other programs, and runs it later
    (`lowered.compile()(*args)` is `create_state(init_params, tx, seed, shardings)`)."""
    fn = lambda k: _init(init_params, tx, k)  # noqa: E731
    jitted, args = _lift_constants(fn, shardings, (jax.random.PRNGKey(seed),))
    return jitted.lower(*args), args


def jit_lifting_constants(fn: Callable[..., Any], out_shardings: Any) -> Callable[..., Any]:
    """`jax.jit(fn, out_shardings=...)`, except that the arrays `fn` closes over (the masks
    `pruning.keep_masks` holds, say) enter the program as arguments. As constants they would
    be copied into the program (86 MB for ViT-B/16's masks), and JAX refuses them outright
    when they span devices of several hosts."""
    def call(*args: Any) -> Any:
        jitted, lifted = _lift_constants(fn, out_shardings, args)
        return jitted(*lifted)

    return call


def _lift_constants(fn: Callable[..., Any], out_shardings: Any, args: tuple[Any, ...]
                    ) -> tuple[Any, tuple[Any, ...]]:
    """A jitted function of (constants, *leaves of args) that computes fn(*args), and those
    arguments."""
    from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    tree = jax.tree.structure(shapes)

    def run(consts: list[Any], *leaves: Any) -> Any:
        return jax.tree.unflatten(tree, jaxpr_as_fun(ClosedJaxpr(closed.jaxpr, consts))(*leaves))

    return jax.jit(run, out_shardings=out_shardings), (closed.consts, *jax.tree.leaves(args))
