"""The config schema: every key with its default, and validation before any compute.

Config files in `configs/` start from `base_config()` and change values; they
may not add keys. `validate()` rejects unknown keys, wrong types and impossible
values with one line that names the key.
"""

from __future__ import annotations

from typing import Any

import ml_collections as mlc

from sparse_vit_jax.errors import UserError

STAGES = ('train', 'eval', 'prune')


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.stages = 'train,eval,prune'  # any of train, eval, prune, comma-separated
    c.smoke = False                # True: a tiny model and a few steps, for a CPU check
    c.init_from = ''               # our checkpoint dir or .npz to evaluate/prune/continue
    c.pretrained = ''              # .npz / .pth / .safetensors weights to fine-tune from
    c.reinit_head = True

    c.model = mlc.ConfigDict()
    c.model.name = 'ViT-B_16'
    c.model.image_size = 384
    c.model.numerics = 'jax'       # auto (from the pretrained file) | jax | timm | hf | asyml
    c.model.dtype = 'float32'      # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.attention_impl = 'xla'  # xla | cudnn (fused attention; NVIDIA GPU, bfloat16)
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.0
    c.model.hidden_size = 0        # 0 = the variant's; set to build a custom size
    c.model.num_layers = 0
    c.model.num_heads = 0
    c.model.mlp_dim = 0
    c.model.patch_size = 0

    c.data = mlc.ConfigDict()
    c.data.name = 'digits'         # digits | cifar10 | cifar100 | imagenet100
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.preprocess = 'paper'    # paper | inception_crop
    c.data.flip = True
    c.data.shuffle_buffer = 10_000
    c.data.source = 'folder'       # imagenet100: folder | imagenet2012
    c.data.root = ''               # imagenet100 folder tree root/{train,val}/<wnid>/
    c.data.class_list = ''         # imagenet100: one WordNet ID per line

    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 20.0
    c.num_steps = 0                # > 0 overrides num_epochs

    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = 'sgd'       # sgd | adamw
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mode = 'coupled'  # coupled (torch SGD) | decoupled
    c.optimizer.grad_clip = 0.0    # global-norm clip; 0 = off
    c.optimizer.accumulate = 1     # gradient accumulation steps

    c.schedule = mlc.ConfigDict()
    c.schedule.name = 'onecycle'   # onecycle | warmup_cosine | constant
    c.schedule.warmup_steps = 500
    c.schedule.div_factor = 25.0
    c.schedule.final_div_factor = 1e4
    c.schedule.cycle_momentum = True
    c.schedule.base_momentum = 0.85
    c.schedule.max_momentum = 0.95

    c.sparsity = mlc.ConfigDict()
    c.sparsity.attention = mlc.ConfigDict()
    c.sparsity.attention.weight = 0.0
    c.sparsity.attention.layers = 'last'   # last | all | comma-separated block indices
    c.sparsity.l1 = mlc.ConfigDict()
    c.sparsity.l1.weight = 0.0
    c.sparsity.l1.mode = 'subgradient'     # subgradient | proximal
    c.sparsity.l1.schedule = 'constant'    # constant | linear (0 -> weight)
    c.sparsity.l1.include = ''             # comma-separated regexes; '' = the pruning pool

    c.prune = mlc.ConfigDict()
    c.prune.ratios = '0.1,0.2,0.3,0.4,0.5'
    c.prune.scope = 'global'               # global | layerwise
    c.prune.include = ''                   # comma-separated regexes; '' = the paper's pool

    c.sweep = mlc.ConfigDict()             # python -m sparse_vit_jax.sweep
    c.sweep.variants = 'baseline,attention,l1_subgradient,l1_proximal'
    c.sweep.seeds = 3
    c.sweep.attention_weight = 0.01        # the paper's lambda
    c.sweep.attention_layers = 'last'
    c.sweep.l1_weight = 1e-4               # L1 subgradient strength (added to the gradient)
    c.sweep.l1_proximal_weight = 1e-2      # L1 proximal strength (threshold lr * this per step)
    c.sweep.finetune_steps = 0             # > 0: also fine-tune each pruned model, masks kept

    c.mesh = mlc.ConfigDict()
    c.mesh.fsdp = False                    # shard params and optimizer state over devices

    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.log_every_steps = 50
    return c


def paper_recipe(c: mlc.ConfigDict, dataset: str) -> mlc.ConfigDict:
    """The paper's fine-tuning recipe (its implementation's values) on `dataset`."""
    c.model.name, c.model.image_size = 'ViT-B_16', 384
    c.model.numerics = 'auto'      # from the weights' format (the paper's .pth: 'asyml')
    c.data.name = dataset
    c.data.shuffle_buffer = 50_000  # the paper's code never shuffled; we do
    c.batch_size, c.num_epochs = 16, 20.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = 'sgd', 1e-3, 0.9
    c.optimizer.weight_decay, c.optimizer.weight_decay_mode = 1e-4, 'coupled'
    c.schedule.name, c.schedule.warmup_steps = 'onecycle', 500  # momentum 0.95 -> 0.85 -> 0.95
    c.sparsity.attention.weight, c.sparsity.attention.layers = 0.01, 'last'
    return c


def _check_same_schema(c: Any, ref: Any, prefix: str = '') -> None:
    for k in c.keys():
        if k not in ref:
            raise UserError(f'unknown config key {prefix}{k}; see sparse_vit_jax/configs.py')
        v, r = c[k], ref[k]
        if isinstance(r, mlc.ConfigDict):
            if not isinstance(v, mlc.ConfigDict):
                raise UserError(f'config {prefix}{k} must be a group of keys, got {v!r}')
            _check_same_schema(v, r, f'{prefix}{k}.')
        elif type(v) is not type(r) and not (isinstance(r, float) and isinstance(v, int)
                                             and not isinstance(v, bool)):
            raise UserError(f'config {prefix}{k} must be {type(r).__name__}, got {v!r}')


def from_saved(saved: dict[str, Any]) -> mlc.ConfigDict:
    """A config saved by a run (its checkpoint meta) on today's schema.

    Keys added since the run was saved take their defaults, so checkpoints of
    older versions keep loading; keys the schema no longer has are an error.
    """
    def merge(c: mlc.ConfigDict, d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if k not in c:
                raise UserError(f'the saved config has key {prefix}{k}, unknown to this version')
            if isinstance(c[k], mlc.ConfigDict):
                merge(c[k], v, f'{prefix}{k}.')
            else:
                c[k] = v
    c = base_config()
    merge(c, saved, '')
    return c


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(',') if x.strip()]
    except ValueError:
        raise UserError(f'config prune.ratios must be comma-separated numbers, got {text!r}'
                        ) from None
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise UserError(f'config prune.ratios must lie in [0, 1), got {bad[0]}')
    return ratios


def parse_layers(text: str) -> str | list[int]:
    if text in ('last', 'all'):
        return text
    try:
        return [int(x) for x in text.split(',')]
    except ValueError:
        raise UserError(f"config sparsity.attention.layers must be 'last', 'all' or block "
                        f'indices like 0,11; got {text!r}') from None


def _one_of(value: Any, key: str, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise UserError(f'config {key} must be one of {", ".join(map(str, choices))}, '
                        f'got {value!r}')


def _positive(c: Any, *keys: str, strict: bool = True) -> None:
    for k in keys:
        v = c
        for part in k.split('.'):
            v = v[part]
        if v < 0 or (strict and v == 0):
            raise UserError(f'config {k} must be {">" if strict else ">="} 0, got {v}')


def validate(c: Any) -> None:
    """One clear UserError for the first problem found; returns None if the config is sound."""
    from sparse_vit_jax.data import DATASETS
    from sparse_vit_jax.models import NUMERICS, VARIANTS

    _check_same_schema(c, base_config())
    stages = [s.strip() for s in c.stages.split(',') if s.strip()]
    for s in stages:
        _one_of(s, 'stages', STAGES)
    if not stages:
        raise UserError('config stages is empty; use e.g. train,eval,prune')
    _one_of(c.model.name, 'model.name', tuple(VARIANTS))
    _one_of(c.model.numerics, 'model.numerics', ('auto', *NUMERICS))
    _one_of(c.model.dtype, 'model.dtype', ('float32', 'bfloat16'))
    _one_of(c.model.attention_impl, 'model.attention_impl', ('xla', 'cudnn'))
    if c.model.attention_impl == 'cudnn' and c.model.dtype != 'bfloat16':
        raise UserError('config model.attention_impl=cudnn needs model.dtype=bfloat16')
    _one_of(c.data.name, 'data.name', DATASETS)
    _one_of(c.data.preprocess, 'data.preprocess', ('paper', 'inception_crop'))
    _one_of(c.data.source, 'data.source', ('folder', 'imagenet2012'))
    _one_of(c.optimizer.name, 'optimizer.name', ('sgd', 'adamw'))
    _one_of(c.optimizer.weight_decay_mode, 'optimizer.weight_decay_mode',
            ('coupled', 'decoupled'))
    _one_of(c.schedule.name, 'schedule.name', ('onecycle', 'warmup_cosine', 'constant'))
    _one_of(c.sparsity.l1.mode, 'sparsity.l1.mode', ('subgradient', 'proximal'))
    _one_of(c.sparsity.l1.schedule, 'sparsity.l1.schedule', ('constant', 'linear'))
    _one_of(c.prune.scope, 'prune.scope', ('global', 'layerwise'))
    _positive(c, 'model.image_size', 'batch_size', 'eval_batch_size', 'optimizer.lr',
              'optimizer.accumulate', 'checkpoint_every_steps', 'keep_checkpoints',
              'log_every_steps', 'data.shuffle_buffer')
    _positive(c, 'num_epochs', 'num_steps', 'optimizer.weight_decay', 'optimizer.grad_clip',
              'sparsity.attention.weight', 'sparsity.l1.weight', 'schedule.warmup_steps',
              'model.dropout_rate', 'model.attention_dropout_rate', strict=False)
    if c.num_steps == 0 and c.num_epochs == 0 and 'train' in stages:
        raise UserError('config needs num_steps > 0 or num_epochs > 0 to train')
    if not 0 <= c.model.dropout_rate < 1 or not 0 <= c.model.attention_dropout_rate < 1:
        raise UserError('config model.dropout_rate and attention_dropout_rate must be in [0, 1)')
    patch = c.model.patch_size or VARIANTS[c.model.name]['patch_size']
    if c.model.image_size % patch:
        raise UserError(f'config model.image_size {c.model.image_size} is not divisible by the '
                        f'patch size {patch}')
    parse_ratios(c.prune.ratios)
    parse_layers(c.sparsity.attention.layers)
    if c.data.name == 'imagenet100' and not c.data.class_list:
        raise UserError('config data.class_list is required for imagenet100 (one WordNet ID '
                        'per line)')
    from sparse_vit_jax.sweep import VARIANTS as SWEEP_VARIANTS
    for v in c.sweep.variants.split(','):
        _one_of(v.strip(), 'sweep.variants', tuple(SWEEP_VARIANTS))
    _positive(c, 'sweep.seeds')
    _positive(c, 'sweep.l1_weight', 'sweep.l1_proximal_weight', 'sweep.attention_weight',
              'sweep.finetune_steps',
              strict=False)
    parse_layers(c.sweep.attention_layers)
    if ('train' not in stages) and not c.init_from:
        raise UserError('config init_from must name a checkpoint when stages has no train')


def apply_smoke(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """A quick CPU run of any config: the tiny `testing` model, a few steps, no weights."""
    c = mlc.ConfigDict(c.to_dict())
    c.model.name, c.model.image_size = 'testing', 32
    for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size'):
        c.model[k] = 0
    c.pretrained, c.batch_size, c.eval_batch_size = '', 8, 16
    c.num_steps, c.schedule.warmup_steps = 6, 2
    c.checkpoint_every_steps, c.log_every_steps = 3, 2
    c.data.shuffle_buffer = min(c.data.shuffle_buffer, 256)
    return c
