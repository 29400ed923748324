"""The config schema: every key with its default and domain, validated before any compute.

`base_config()` returns a locked `ConfigDict`: config files in `configs/` and
`--config.KEY=VALUE` overrides change values but cannot add keys, and each key
keeps its type (ml_collections enforces both). Lists are tuples:

    --config.prune.ratios="(0.1,0.5)"   --config.prune.include="('encoderblock_\\d{1,2}/.*',)"

(`stages` and `sweep.variants` also take plain words: `--config.stages=eval,prune`.)
`validate()` then checks every value's domain and raises one `UserError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import ml_collections as mlc

from sparse_vit_jax.errors import UserError

STAGES = ('train', 'eval', 'prune')
PAPER_VARIANTS = ('baseline', 'attention', 'l1_subgradient', 'l1_proximal')
SWEEP_VARIANTS = (*PAPER_VARIANTS, 'gradual')  # gradual: one cell per ratio, pruned while
#                                                 training to it (not in the default list)
WORD_LISTS = ('stages', 'sweep.variants')  # tuples of plain words: 'a,b' is accepted too


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.rng_impl = 'auto'            # dropout RNG: auto (threefry on CPU, rbg on GPU/TPU) |
                                   # threefry | rbg | unsafe_rbg
    c.compile_cache = 'auto'       # compiled XLA programs kept across runs and resumes: auto
                                   # (GPU/TPU: ~/.cache/sparse_vit_jax/xla; CPU: JAX's
                                   # default) | '' (JAX's default) | a directory (or gs://)
    c.stages = STAGES              # any of train, eval, prune, in this order
    c.smoke = False                # True: a tiny model and a few steps, for a CPU check
    c.init_from = ''               # our run dir or .npz to evaluate/prune/continue
    c.pretrained = ''              # .npz / .pth / .safetensors weights to fine-tune from
    c.reinit_head = True

    c.model = mlc.ConfigDict()
    c.model.name = 'ViT-B_16'
    c.model.image_size = 384
    c.model.numerics = 'jax'       # auto (from the weights' format) | jax | timm | hf | asyml
    c.model.dtype = 'float32'      # compute: float32 | bfloat16 | auto (bfloat16 on TPUs and
                                   # GPUs, NVIDIA's from Ampere; else float32); parameters and
                                   # optimizer stay float32
    c.model.attention_impl = 'auto'  # auto (cudnn where it runs: NVIDIA GPUs from Ampere, in
                                     # bfloat16; else xla) | xla |
                                     # cudnn (fused, tokens padded) | padded_xla (its check) |
                                     # pallas (Pallas flash attention on TPUs, tokens padded)
    c.model.remat = 'none'         # none | full | dots: recompute activations, larger batches
    c.model.dropout_rate = 0.1
    c.model.dropout_impl = 'auto'  # how dropout draws its mask: auto (hash on GPUs, flax
                                   # elsewhere) | flax (nn.Dropout's draws) | bytes (a random
                                   # byte each: 0.1 is drawn as 0.1016) | hash (a hash of each
                                   # element's index, fused where the mask is applied and
                                   # recomputed in the backward pass; models/dropout.py)
    c.model.gelu_form = 'auto'     # how the tanh GELU is written where a dropout follows it in
                                   # training: auto (sigmoid on GPUs, else tanh) | tanh |
                                   # sigmoid (x sigmoid(2u): the same function, kept out of
                                   # cuBLASLt's GELU epilogue; models/gelu.py)
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
    c.data.val_fraction = 0.0      # > 0: the last such share of the training split (TFDS
    #                                slicing, the same examples every run) is held out as a
    #                                validation split: training never sees it, evaluations
    #                                during training (eval_every_steps) read it instead of the
    #                                test split, and the eval stage reports it beside the test
    #                                split; 0 = none

    c.batch_size = 16              # global training batch (all devices, all hosts)
    c.eval_batch_size = 64         # rounded up to a multiple of the device count
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
    c.sparsity.attention.layers = (-1,)    # block indices, negative from the end: (-1,) = last
    c.sparsity.l1 = mlc.ConfigDict()
    c.sparsity.l1.weight = 0.0
    c.sparsity.l1.mode = 'subgradient'     # subgradient | proximal
    c.sparsity.l1.schedule = 'constant'    # constant | linear (0 -> weight)
    c.sparsity.l1.include = ()             # regexes over parameter paths; () = the pruning pool
    c.sparsity.gradual = mlc.ConfigDict()  # pruning while training (Zhu & Gupta 2017's schedule)
    c.sparsity.gradual.sparsity = 0.0      # > 0: the pool's zero fraction at the end, reached
    #                                        on the cubic schedule by global magnitude masks
    #                                        that the optimizer state keeps (pruned weights
    #                                        stay 0); 0 = off
    c.sparsity.gradual.start = 0.2         # where pruning starts and where it reaches its
    c.sparsity.gradual.end = 0.75          # final sparsity, as fractions of training (at 0,
    #                                        the zero-initialised head, in the pool, would be
    #                                        pruned at the first update, for good)
    c.sparsity.gradual.every_steps = 100   # optimizer steps between mask updates
    c.sparsity.gradual.include = ()        # regexes over parameter paths; () = the pruning pool
    c.sparsity.keep_zeros = False          # True: the pool's weights that are exactly zero in
    #                                        the starting weights (init_from / pretrained: a
    #                                        pruned export or run) stay zero while training
    #                                        (fine-tuning a pruned model, masks kept)

    c.prune = mlc.ConfigDict()
    c.prune.ratios = (0.1, 0.2, 0.3, 0.4, 0.5)
    c.prune.scope = 'global'               # global | layerwise
    c.prune.include = ()                   # regexes over parameter paths; () = the paper's pool
    c.prune.nm = ''                        # N:M patterns evaluated too, e.g. '2:4' or
    #                                        '2:4,1:4' (n kept in every m consecutive inputs of
    #                                        each kernel of the pool, its LayerNorm scales
    #                                        aside; 2:4 is what NVIDIA's sparse tensor cores
    #                                        run); '' = none

    c.sweep = mlc.ConfigDict()             # python -m sparse_vit_jax.sweep
    c.sweep.variants = PAPER_VARIANTS        # any of SWEEP_VARIANTS
    c.sweep.seeds = 3
    c.sweep.attention_weight = 0.01        # the paper's lambda
    c.sweep.attention_layers = (-1,)
    c.sweep.l1_weight = 1e-4               # L1 subgradient strength (added to the gradient)
    c.sweep.l1_proximal_weight = 1e-2      # L1 proximal strength (threshold lr * this per step)
    c.sweep.finetune_steps = 0             # > 0: also fine-tune each pruned model, masks kept

    c.mesh = mlc.ConfigDict()
    c.mesh.fsdp = False                    # shard params and optimizer state over devices

    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.checkpoint_timeout_s = 1200  # with several hosts: how long one host's checkpoint write
    #                                may keep the others waiting before all stop with one line
    c.log_every_steps = 50
    c.eval_every_steps = 0         # > 0: also evaluate on the test split every so many training
    #                                steps (a log line; tensorboard eval/*); the eval stage
    #                                evaluates the final weights
    c.lock()
    return c


def paper_recipe(c: mlc.ConfigDict, dataset: str) -> mlc.ConfigDict:
    """The paper's fine-tuning recipe (its implementation's values) on `dataset`."""
    c.model.name, c.model.image_size = 'ViT-B_16', 384
    c.model.numerics = 'auto'      # from the weights' format (the paper's .pth: 'asyml')
    c.model.dtype = 'auto'         # bfloat16 on TPUs and GPUs (NVIDIA's from Ampere), else float32
    c.data.name = dataset
    c.data.shuffle_buffer = 50_000  # the paper's code never shuffled; we do
    c.batch_size, c.num_epochs = 16, 20.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = 'sgd', 1e-3, 0.9
    c.optimizer.weight_decay, c.optimizer.weight_decay_mode = 1e-4, 'coupled'
    c.schedule.name, c.schedule.warmup_steps = 'onecycle', 500  # momentum 0.95 -> 0.85 -> 0.95
    c.sparsity.attention.weight, c.sparsity.attention.layers = 0.01, (-1,)
    return c


def check_schema(c: Any, where: str) -> None:
    """UserError unless `c` is a ConfigDict with exactly `base_config()`'s keys (what a config
    file that builds its own dict gets wrong)."""
    start = 'start from sparse_vit_jax.configs.base_config(), as configs/digits.py does'
    if not isinstance(c, mlc.ConfigDict):
        raise UserError(f'{where}: get_config() returned {type(c).__name__} {c!r:.40}, not '
                        f'a ConfigDict; {start}')
    want, got = set(_flat(base_config().to_dict())), set(_flat(c.to_dict()))
    for keys, what in ((want - got, 'lacks the keys'), (got - want, 'has keys unknown here:')):
        if keys:
            more = ', ...' if len(keys) > 3 else ''
            raise UserError(f'{where} {what} {", ".join(sorted(keys)[:3])}{more}; {start}')


def copy(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """An independent, still locked copy (types and the key set kept)."""
    out = mlc.ConfigDict(c.to_dict(), type_safe=True)
    out.lock()
    return out


# ---- older runs' configs ---------------------------------------------------------------------

def _legacy_value(key: str, old: Any, default: Any, saved: dict[str, Any]) -> Any:
    """Values as older versions wrote them: comma strings and 'last'/'all' for tuples."""
    if not isinstance(default, tuple):
        return old
    if isinstance(old, list):
        return tuple(old)
    if not isinstance(old, str):
        return old
    if key.endswith('layers'):
        if old in ('last', 'all'):
            m = saved.get('model', {})
            depth = m.get('num_layers') or _variant_depth(m.get('name', ''))
            return (-1,) if old == 'last' else tuple(range(depth))
        return tuple(int(x) for x in old.split(','))
    parts = [x.strip() for x in old.split(',') if x.strip()]
    return tuple(float(x) for x in parts) if key.endswith('ratios') else tuple(parts)


def _variant_depth(name: str) -> int:
    from sparse_vit_jax.models import VARIANTS
    return VARIANTS[name]['num_layers'] if name in VARIANTS else 1


def _renamed_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """Keys older versions wrote under another name: model.dropout_bits (32: flax's draws,
    8: one byte each) is model.dropout_impl."""
    model = dict(saved.get('model', {}))
    if 'dropout_bits' in model:
        model['dropout_impl'] = {8: 'bytes'}.get(model.pop('dropout_bits'), 'flax')
        saved = {**saved, 'model': model}
    return saved


def from_saved(saved: dict[str, Any]) -> mlc.ConfigDict:
    """A config saved by a run (its checkpoint meta) on today's schema.

    Keys added since the run was saved take their defaults and keys and values written in
    older forms are converted, so checkpoints of older versions keep loading;
    keys the schema no longer has are an error.
    """
    saved = _renamed_keys(saved)

    def merge(c: mlc.ConfigDict, d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if k not in c:
                raise UserError(f'the saved config has key {prefix}{k}, unknown to this version')
            if isinstance(c[k], mlc.ConfigDict):
                merge(c[k], v, f'{prefix}{k}.')
            else:
                c[k] = _legacy_value(f'{prefix}{k}', v, c[k], saved)
    c = base_config()
    merge(c, saved, '')
    return c


# ---- re-runs of a workdir ---------------------------------------------------------------------

# Keys a re-run of the same workdir may change: they do not shape its checkpoints or the
# training that produced them (how often to log and save, what to evaluate and prune after;
# kernels and how dropout draws its masks, which may differ between the machines of a run).
RERUN_FREE = ('stages', 'smoke', 'compile_cache', 'init_from', 'log_every_steps',
              'eval_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints', 'checkpoint_timeout_s',
              'eval_batch_size', 'data.data_dir', 'data.root', 'mesh.fsdp', 'model.attention_impl',
              'model.remat', 'model.dropout_impl', 'model.gelu_form', 'prune.', 'sweep.')


def _flat(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
    return out


def training_keys(c: Any) -> dict[str, Any]:
    """The config's keys that shape training and its checkpoints, flattened. The settings of
    gradual pruning, keep_zeros and the validation split count only when on, so runs saved
    before they existed keep their fingerprint (a sweep's cells are found again)."""
    keys = {k: v for k, v in _flat(json.loads(c.to_json())).items()
            if not k.startswith(RERUN_FREE)}
    if not keys.get('sparsity.gradual.sparsity'):
        keys = {k: v for k, v in keys.items() if not k.startswith('sparsity.gradual.')}
    for key in ('sparsity.keep_zeros', 'data.val_fraction'):
        if not keys.get(key):
            keys.pop(key, None)
    return keys


def fingerprint(keys: dict[str, Any]) -> str:
    """8 hex digits naming a JSON-able dict (its key order aside)."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]


def training_fingerprint(c: Any) -> str:
    return fingerprint(training_keys(c))


def training_differences(saved: dict[str, Any], now: Any) -> list[str]:
    """'key (saved -> now)' for each training key in which `now` differs from a saved run.

    More steps are accepted when nothing depends on the total (constant schedules, no
    gradual pruning, whose steps are fractions of it): the run just goes on, and the new
    count is recorded with its next checkpoint.
    """
    old, new = training_keys(from_saved(saved)), training_keys(now)
    constant = (now.schedule.name == 'constant' and now.sparsity.l1.schedule == 'constant'
                and not now.sparsity.gradual.sparsity)
    diffs = []
    for k, v in new.items():
        if old.get(k) == v:
            continue
        if constant and k in ('num_steps', 'num_epochs') and v >= old.get(k, 0):
            continue
        diffs.append(f'{k} ({old.get(k)!r} -> {v!r})')
    return diffs


# ---- validation ------------------------------------------------------------------------------

def normalize(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Word lists given as one comma string on the command line -> tuples of words."""
    for key in WORD_LISTS:
        group, _, leaf = key.rpartition('.')
        holder = c[group] if group else c
        words = [w.strip(' \'"()') for item in holder[leaf] for w in str(item).split(',')]
        holder[leaf] = tuple(w for w in words if w)
    return c


def _get(c: Any, key: str) -> Any:
    for part in key.split('.'):
        c = c[part]
    return c


def _leaves(c: Any, prefix: str = '') -> list[tuple[str, Any]]:
    out = []
    for k, v in c.items():
        if isinstance(v, mlc.ConfigDict):
            out += _leaves(v, f'{prefix}{k}.')
        else:
            out.append((f'{prefix}{k}', v))
    return out


def _one_of(c: Any, key: str, choices: tuple[Any, ...]) -> None:
    value = _get(c, key)
    if value not in choices:
        raise UserError(f'config {key} must be one of {", ".join(map(str, choices))}, '
                        f'got {value!r}')


def _at_least(c: Any, low: float, *keys: str, strict: bool = False) -> None:
    for k in keys:
        v = _get(c, k)
        if v < low or (strict and v == low):
            raise UserError(f'config {k} must be {">" if strict else ">="} {low}, got {v}')


def _fraction(c: Any, *keys: str) -> None:
    for k in keys:
        v = _get(c, k)
        if not 0 <= v < 1:
            raise UserError(f'config {k} must be in [0, 1), got {v}')


def _regexes(c: Any, key: str) -> None:
    import re
    for pattern in _get(c, key):
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f'config {key} must be a tuple of non-empty regexes, got {pattern!r}')
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f'config {key}: {pattern!r} is not a valid regex ({e})') from None


def _block_indices(c: Any, key: str, depth: int) -> None:
    layers = _get(c, key)
    if not layers or any(not isinstance(i, int) or not -depth <= i < depth for i in layers):
        raise UserError(f'config {key} must be block indices of the {depth}-block model '
                        f'(negative from the end; (-1,) = the last block), got {layers!r}')


def nm_patterns(c: Any) -> list[str]:
    """config prune.nm as its list of patterns ('2:4,1:4' -> ['2:4', '1:4'])."""
    return [p.strip() for p in c.prune.nm.split(',') if p.strip()]


def _nm_patterns(c: Any) -> None:
    from sparse_vit_jax.pruning import parse_nm
    seen: list[tuple[int, int]] = []
    for pattern in nm_patterns(c):
        try:
            nm = parse_nm(pattern)
        except UserError as e:
            raise UserError(f'config prune.nm: {e}') from None
        if nm in seen:
            raise UserError(f'config prune.nm holds {nm[0]}:{nm[1]} twice, got '
                            f'{c.prune.nm!r}; give each once')
        seen.append(nm)


def _once_each(c: Any, key: str) -> None:
    """Each value once: a repeat would be computed and reported twice."""
    values = _get(c, key)
    if twice := [v for i, v in enumerate(values) if v in values[:i]]:
        raise UserError(f'config {key} holds {twice[0]!r} twice, got {values!r} (a tuple '
                        'override given twice on one command line is concatenated); give each '
                        'once')


def model_shape(c: Any) -> dict[str, int]:
    """The model's (hidden_size, num_layers, num_heads, mlp_dim, patch_size) after overrides."""
    from sparse_vit_jax.models import VARIANTS
    v = VARIANTS[c.model.name]
    return {k: c.model[k] or v[k] for k in v}


MAX_MODEL_BYTES = 2 ** 40  # no device holds a 1 TiB parameter set


def approx_params(c: Any, shape: dict[str, int]) -> int:
    """The ViT's parameter count from its shape, without the head (exact integers: a size
    typed with extra zeros cannot overflow here, as it would in JAX's shapes)."""
    d, m, p = shape['hidden_size'], shape['mlp_dim'], shape['patch_size']
    tokens = (c.model.image_size // p) ** 2 + 1
    block = 4 * d * d + 2 * d * m + m + 9 * d
    return 3 * p * p * d + tokens * d + shape['num_layers'] * block + 4 * d


def validate(c: Any) -> None:
    """One clear UserError for the first problem found; returns None if the config is sound."""
    from sparse_vit_jax.data import DATASETS
    from sparse_vit_jax.models import DROPOUT_IMPLS, GELU_FORMS, NUMERICS, VARIANTS

    for key, v in _leaves(c):
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f'config {key} must be a finite number, got {v}')
        if isinstance(v, tuple) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            raise UserError(f'config {key} must hold finite numbers, got {v}')
    if not c.stages or any(s not in STAGES for s in c.stages):
        raise UserError(f'config stages must be some of {", ".join(STAGES)} (e.g. '
                        f'--config.stages=eval,prune), got {c.stages!r}')
    _once_each(c, 'stages')
    if (order := tuple(s for s in STAGES if s in c.stages)) != tuple(c.stages):
        raise UserError(f'config stages run in the order {", ".join(STAGES)}; write '
                        f'--config.stages={",".join(order)} (got {c.stages!r}). To prune and '
                        'then fine-tune: export --prune R --format npz, then train from it with '
                        'config.init_from and sparsity.keep_zeros=True')
    _one_of(c, 'model.name', tuple(VARIANTS))
    _one_of(c, 'model.numerics', ('auto', *NUMERICS))
    _one_of(c, 'model.dtype', ('auto', 'float32', 'bfloat16'))
    _one_of(c, 'model.attention_impl', ('auto', 'xla', 'cudnn', 'padded_xla',
                                              'pallas'))
    _one_of(c, 'model.remat', ('none', 'full', 'dots'))
    _one_of(c, 'model.dropout_impl', ('auto', *DROPOUT_IMPLS))
    _one_of(c, 'model.gelu_form', ('auto', *GELU_FORMS))
    _one_of(c, 'rng_impl', ('auto', 'threefry', 'rbg', 'unsafe_rbg'))
    if c.model.attention_impl == 'cudnn' and c.model.dtype == 'float32':
        raise UserError('config model.attention_impl=cudnn needs model.dtype=bfloat16 (or auto)')
    _one_of(c, 'data.name', DATASETS)
    _one_of(c, 'data.preprocess', ('paper', 'inception_crop'))
    _one_of(c, 'data.source', ('folder', 'imagenet2012'))
    _one_of(c, 'optimizer.name', ('sgd', 'adamw'))
    _one_of(c, 'optimizer.weight_decay_mode', ('coupled', 'decoupled'))
    _one_of(c, 'schedule.name', ('onecycle', 'warmup_cosine', 'constant'))
    _one_of(c, 'sparsity.l1.mode', ('subgradient', 'proximal'))
    _one_of(c, 'sparsity.l1.schedule', ('constant', 'linear'))
    _one_of(c, 'prune.scope', ('global', 'layerwise'))
    _at_least(c, 0, 'model.image_size', 'batch_size', 'eval_batch_size', 'optimizer.lr',
              'optimizer.accumulate', 'checkpoint_every_steps', 'keep_checkpoints',
              'checkpoint_timeout_s', 'log_every_steps', 'data.shuffle_buffer',
              'schedule.div_factor', 'schedule.final_div_factor', 'sweep.seeds', strict=True)
    _at_least(c, 0, 'seed', 'num_epochs', 'num_steps', 'eval_every_steps', 'optimizer.weight_decay',
              'optimizer.grad_clip', 'sparsity.attention.weight', 'sparsity.l1.weight',
              'schedule.warmup_steps', 'sweep.l1_weight', 'sweep.l1_proximal_weight',
              'sweep.attention_weight', 'sweep.finetune_steps', 'model.hidden_size',
              'model.num_layers', 'model.num_heads', 'model.mlp_dim', 'model.patch_size')
    _fraction(c, 'model.dropout_rate', 'model.attention_dropout_rate', 'optimizer.momentum',
              'optimizer.b1', 'optimizer.b2', 'schedule.base_momentum', 'schedule.max_momentum')
    _fraction(c, 'sparsity.gradual.sparsity')
    if not 0 <= c.data.val_fraction <= 0.5:
        raise UserError(f'config data.val_fraction (the share of the training split held out '
                        f'for validation) must be in [0, 0.5], got {c.data.val_fraction}')
    g = c.sparsity.gradual
    if not 0 <= g.start <= g.end <= 1:
        raise UserError(f'config sparsity.gradual.start and .end must satisfy 0 <= start <= end '
                        f'<= 1 (fractions of training), got {g.start} and {g.end}')
    _at_least(c, 0, 'sparsity.gradual.every_steps', strict=True)
    if c.sparsity.keep_zeros and 'train' in c.stages:
        if c.sparsity.gradual.sparsity > 0:
            raise UserError('config sparsity.keep_zeros and sparsity.gradual.sparsity > 0 both '
                            'set where zeros are kept: choose one (keep_zeros fine-tunes an '
                            'already pruned model, gradual prunes while training)')
        if not (c.init_from or c.pretrained):
            raise UserError('config sparsity.keep_zeros keeps the zeros of the starting weights: '
                            'set config.init_from (a pruned run or export --prune ... --format '
                            'npz) or config.pretrained')
    if c.num_steps == 0 and c.num_epochs == 0 and 'train' in c.stages:
        raise UserError('config needs num_steps > 0 or num_epochs > 0 to train')
    shape = model_shape(c)
    if shape['hidden_size'] % shape['num_heads']:
        raise UserError(f'config model.num_heads {shape["num_heads"]} does not divide '
                        f'model.hidden_size {shape["hidden_size"]}')
    if c.model.image_size % shape['patch_size']:
        raise UserError(f'config model.image_size {c.model.image_size} is not divisible by the '
                        f'patch size {shape["patch_size"]}')
    if (n := approx_params(c, shape)) * 4 > MAX_MODEL_BYTES:
        raise UserError(f'config model.* describe a ViT of about {n:.2g} parameters '
                        f'({n * 4 / 2 ** 40:.0f} TiB in float32), more than any device holds; '
                        'check model.hidden_size, mlp_dim, num_layers, patch_size and image_size')
    if c.optimizer.accumulate >= 2 ** 31:
        raise UserError(f'config optimizer.accumulate must be < 2**31, got '
                        f'{c.optimizer.accumulate}')
    if c.checkpoint_timeout_s > (2 ** 31 - 1) // 1000:  # int32 milliseconds in barriers
        raise UserError(f'config checkpoint_timeout_s must be <= 2147483 (24.8 days), got '
                        f'{c.checkpoint_timeout_s}')
    if 'train' in c.stages and 0 < c.num_steps < c.optimizer.accumulate:
        raise UserError(f'config optimizer.accumulate {c.optimizer.accumulate} is more than '
                        f'num_steps {c.num_steps}: no update would ever be applied; lower it or '
                        'train longer')
    if not c.prune.ratios or any(not 0.0 <= r < 1.0 for r in c.prune.ratios):
        raise UserError(f'config prune.ratios must be a non-empty tuple of numbers in [0, 1), '
                        f'e.g. "(0.1,0.5)"; got {c.prune.ratios!r}')
    _once_each(c, 'prune.ratios')
    _nm_patterns(c)
    _regexes(c, 'prune.include')
    _regexes(c, 'sparsity.l1.include')
    _regexes(c, 'sparsity.gradual.include')
    _block_indices(c, 'sparsity.attention.layers', shape['num_layers'])
    _block_indices(c, 'sweep.attention_layers', shape['num_layers'])
    if c.data.name == 'imagenet100' and not c.data.class_list:
        raise UserError('config data.class_list is required for imagenet100 (one WordNet ID '
                        'per line)')
    if not c.sweep.variants or any(v not in SWEEP_VARIANTS for v in c.sweep.variants):
        raise UserError(f'config sweep.variants must be some of {", ".join(SWEEP_VARIANTS)}, '
                        f'got {c.sweep.variants!r}')
    _once_each(c, 'sweep.variants')
    if 'train' not in c.stages and not c.init_from:
        raise UserError('config init_from must name a checkpoint when stages has no train')


def apply_smoke(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """A quick CPU run of any config: the tiny `testing` model, a few steps, no pretrained
    weights (so no zeros of theirs to keep)."""
    c = copy(c)
    c.model.name, c.model.image_size = 'testing', 32
    for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size'):
        c.model[k] = 0
    c.pretrained, c.batch_size, c.eval_batch_size = '', 8, 16
    c.sparsity.keep_zeros = c.sparsity.keep_zeros and bool(c.init_from)
    c.num_steps, c.schedule.warmup_steps = 6, 2
    c.checkpoint_every_steps, c.log_every_steps = 3, 2
    c.data.shuffle_buffer = min(c.data.shuffle_buffer, 256)
    return c
