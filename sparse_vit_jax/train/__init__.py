"""The training engine: state, step builders, checkpoints and the loop.

    train.state          TrainState, abstract_state (eval_shape), create_state (lower_state
                         to compile it ahead), shardings
    train.steps          make_train_step / make_eval_step from (loss_fn, optax tx, clu metrics)
    train.checkpointing  Checkpointer (orbax cadence, damaged-step fallback), restore_params
    train.loop           train_loop: metrics, progress, writers, checkpoints, SIGTERM
    train.memory         whether a state or a compiled step fits the devices' memory
    train.sharding       the device mesh and named shardings

It knows models, losses and optimizers only as functions and optax transforms,
and nothing of pruning or the paper's experiment (`sparse_vit_jax.experiment`
is built on top of it). It can be stepped on synthetic batches without any
input pipeline. This file imports nothing, so that `train.host_memory` can be
set up before JAX or any library starts threads.
"""
