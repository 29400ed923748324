"""Digits: a small ViT trained from scratch on scikit-learn's embedded digits (the default).

    python -m sparse_vit_jax.main --config=configs/digits.py --workdir=runs/digits

Produces in the workdir: checkpoints/, params.npz, results.json and results.csv (test
accuracy unpruned and after global magnitude pruning at 10..90%), tensorboard/ logs.
Expected: about 99% test accuracy unpruned (360 test images), in under a minute
on 2 CPU cores.

The paper's comparison on this data (3 seeds x 4 variants x 9 ratios), its table in
runs/sweep/results.md:

    python -m sparse_vit_jax.sweep --config=configs/digits.py --workdir=runs/sweep
"""

from sparse_vit_jax.configs import base_config


def get_config():
    c = base_config()
    c.model.name = 'testing'
    c.model.image_size = 16        # the 8x8 digits, bilinearly upsampled
    c.model.hidden_size, c.model.num_layers, c.model.num_heads = 64, 4, 4
    c.model.mlp_dim, c.model.patch_size = 128, 4
    c.model.dropout_rate = 0.1
    c.data.name = 'digits'
    c.data.flip = False            # digits are not mirror-symmetric
    c.data.shuffle_buffer = 2000   # the whole train split
    c.batch_size, c.eval_batch_size = 64, 128
    c.num_epochs = 30.0
    c.optimizer.name = 'adamw'
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.weight_decay_mode = 'decoupled'
    c.optimizer.grad_clip = 1.0
    c.schedule.name = 'warmup_cosine'
    c.schedule.warmup_steps = 50
    c.prune.ratios = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    c.checkpoint_every_steps = 200
    # python -m sparse_vit_jax.sweep: strengths tuned for AdamW at this learning rate (the
    # proximal threshold is lr * weight per step, so it needs a far larger weight).
    c.sweep.l1_weight = 1e-4
    c.sweep.l1_proximal_weight = 0.1
    return c
