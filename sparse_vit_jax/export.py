"""Exports a run's (optionally pruned) weights as standard files other frameworks load.

    python -m sparse_vit_jax.export RUN_OR_NPZ --format hf|timm|npz [--prune RATIO | --nm N:M]
        [--structured] [--heads RATIO] [--mlp-units RATIO] [--unit-scope layerwise|global]
        [--numerics auto|jax|timm|hf|asyml] OUT

RUN_OR_NPZ: a run directory (its params.npz and results.json) or our `.npz`.
`--prune RATIO` prunes by global weight magnitude first, over the run's pruning
pool (its config's prune.include and scope), as the run's prune stage evaluated.
`--nm 2:4` prunes to N:M instead (n kept in every m consecutive inputs of each kernel
of the pool, as the run's prune.nm evaluated): in hf and timm files that is along each
Linear weight's in_features, the layout of torch's semi-structured (2:4) sparsity.
`--structured` removes the heads and MLP units that pruning emptied where the
format can hold the smaller widths (npz: per block; hf and timm: one MLP width for
all blocks, and never heads, whose size is tied to width / heads there); the
zeros of what stays are kept. `--heads R` / `--mlp-units R` remove the fraction R of
the heads / MLP units with the smallest kernel L2 norms, per block (`--unit-scope
layerwise`) or ranked over all blocks (`global`; per-block widths: npz only): unlike
`--structured` this changes the logits, so fine-tune the result (the main command's
config.pretrained reads its widths). OUT is a new directory:

- hf:   config.json + model.safetensors: `ViTForImageClassification.from_pretrained(OUT)`;
- timm: config.json + model.safetensors for timm's `vit_*_patch16_*` models;
- npz:  params.npz in the official layout (our loader, big_vision) + model.json.

Each gets a README.md model card: source, widths, sparsity per layer and overall,
accuracy from the run's results, the command. Nothing is written on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sparse_vit_jax.checkpoints import check_values, flatten, unflatten
from sparse_vit_jax.checkpoints.export import ACTIVATIONS, shape_of, to_hf, to_timm
from sparse_vit_jax.checkpoints.io import read_checkpoint, save_npz
from sparse_vit_jax.cli import skip_tpu_without_chips
from sparse_vit_jax.errors import UserError, run_cli

FORMATS = ('hf', 'timm', 'npz')


def read_source(src: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(flat params, the run's results.json or {}) from a run directory or an .npz."""
    p = Path(src)
    results: dict[str, Any] = {}
    if not p.exists():
        raise UserError(f'{src} not found: export takes a run directory or our .npz')
    if p.is_dir():
        if (p / 'results.json').is_file():
            try:
                results = json.loads((p / 'results.json').read_text())
            except json.JSONDecodeError as e:
                raise UserError(f'{p / "results.json"} is not valid JSON ({e}); re-run the '
                                'run\'s command to rewrite it') from None
        if not (p / 'params.npz').is_file():
            raise UserError(f'{p} holds no params.npz: the run has not finished training '
                            '(re-run its command to finish it), or it is not a run directory')
        p = p / 'params.npz'
    elif p.suffix.lower() != '.npz':
        raise UserError(f'{src}: export takes a run directory or our .npz; convert other '
                        'formats first (python -m sparse_vit_jax.convert)')
    flat, _ = read_checkpoint(p, 1)
    check_values(flat, p)
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}, results


def prune(flat: dict[str, np.ndarray], ratio: float, run_config: dict[str, Any]
          ) -> dict[str, np.ndarray]:
    """Magnitude pruning over the run's pool with the run's scope (global by default)."""
    import jax

    from sparse_vit_jax.pruning import apply_masks, magnitude_masks
    cfg = run_config.get('prune', {})
    include = list(cfg.get('include') or []) or None
    params = unflatten(flat)
    masks = magnitude_masks(params, ratio, scope=cfg.get('scope', 'global'), select=include)
    return flatten(jax.device_get(apply_masks(params, masks)))


def prune_nm(flat: dict[str, np.ndarray], n: int, m: int, run_config: dict[str, Any]
             ) -> dict[str, np.ndarray]:
    """N:M pruning of the kernels of the run's pool."""
    import jax

    from sparse_vit_jax.pruning import apply_masks, nm_masks
    include = list(run_config.get('prune', {}).get('include') or []) or None
    params = unflatten(flat)
    return flatten(jax.device_get(apply_masks(params, nm_masks(params, n, m, select=include))))


def remove_empty_units(flat: dict[str, np.ndarray], fmt: str) -> tuple[dict[str, np.ndarray],
                                                                      list[str]]:
    """Drops emptied heads and MLP units as far as `fmt` can express; returns notes."""
    from sparse_vit_jax.pruning import nonzero_units, remove_units, unit_scores
    params = unflatten(flat)
    heads, mlps = unit_scores(params)
    keep_h, keep_m = nonzero_units(heads), nonzero_units(mlps)
    notes = []
    if fmt != 'npz':
        empty_heads = sum(len(s) - len(k) for s, k in zip(heads, keep_h))
        keep_h = [np.arange(len(s)) for s in heads]
        if empty_heads:
            notes.append(f'{empty_heads} emptied heads are kept (as zeros): {fmt} ties the head '
                         'size to width / heads, so it cannot hold fewer heads')
        if len({len(k) for k in keep_m}) > 1:
            notes.append(f'emptied MLP units are kept (as zeros): {fmt} has one MLP width for '
                         f'all blocks, and the blocks keep {[len(k) for k in keep_m]} units')
            keep_m = [np.arange(len(s)) for s in mlps]
    removed_h = sum(len(s) - len(k) for s, k in zip(heads, keep_h))
    removed_m = sum(len(s) - len(k) for s, k in zip(mlps, keep_m))
    notes.insert(0, f'structured: removed {removed_h} heads and {removed_m} MLP units '
                    '(all of their kernel weights were zero)')
    return flatten(remove_units(params, keep_h, keep_m)), notes


def remove_weakest_units(flat: dict[str, np.ndarray], heads: float, mlp_units: float,
                         scope: str) -> tuple[dict[str, np.ndarray], str]:
    """Drops the weakest fraction of heads and MLP units (kernel L2 norm); returns a note."""
    from sparse_vit_jax.pruning import remove_units, strongest_units
    params = unflatten(flat)
    keep_h, keep_m = strongest_units(params, head_ratio=heads, mlp_ratio=mlp_units, scope=scope)
    s = shape_of(flat)
    removed_h = sum(s['num_heads']) - sum(len(k) for k in keep_h)
    removed_m = sum(s['mlp_dim']) - sum(len(k) for k in keep_m)
    note = (f'removed the {removed_h} weakest heads and {removed_m} weakest MLP units '
            f'({scope}, by kernel L2 norm): the logits change, fine-tune before use')
    return flatten(remove_units(params, keep_h, keep_m)), note


def sparsity_lines(flat: dict[str, np.ndarray]) -> tuple[str, float, float]:
    """(a markdown table of kernel sparsity per layer, kernels' zero fraction, all weights')."""
    from sparse_vit_jax.pruning import sparsity_report
    params = unflatten(flat)
    kernels = sparsity_report(params, [r'.*/kernel'])
    rows = [f'| {r["name"]} | {tuple(flat[r["name"]].shape)} | {r["fraction"]:.4f} |'
            for r in sorted(kernels['tensors'], key=lambda r: _natural(r['name']))]
    table = '| kernel | shape | zero fraction |\n|---|---|---|\n' + '\n'.join(rows)
    return table, kernels['fraction'], sparsity_report(params, ['.*'])['fraction']


def _natural(key: str) -> list[Any]:
    """encoderblock_2 before encoderblock_10."""
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def accuracy_lines(results: dict[str, Any], ratio: float | None, nm: str = '') -> str:
    ev = results.get('eval')
    lines = []
    if ev and ev.get('accuracy') is not None:
        lines.append(f'- unpruned: test accuracy {ev["accuracy"]:.4f} on {ev.get("examples")} '
                     'examples')
    if ratio:
        row = next((r for r in results.get('prune', []) if abs(r['ratio'] - ratio) < 1e-9), None)
        lines.append(f'- pruned at {ratio}: test accuracy {row["accuracy"]:.4f} (the run\'s '
                     'prune stage, same pool and scope)' if row and row.get('accuracy') is not None
                     else f'- pruned at {ratio}: not measured by the run (add {ratio} to its '
                     'prune.ratios and re-run its prune stage)')
    if nm:
        row = next((r for r in results.get('prune_nm', []) if r.get('pattern') == nm), None)
        lines.append(f'- pruned to {nm}: test accuracy {row["accuracy"]:.4f} (the run\'s prune '
                     'stage, same pool)' if row and row.get('accuracy') is not None
                     else f'- pruned to {nm}: not measured by the run (set its prune.nm={nm} '
                     'and re-run its prune stage)')
    return '\n'.join(lines) or '- not measured: the source has no results.json'


HOW_TO_LOAD = {
    'hf': ("from transformers import ViTForImageClassification\n"
           "model = ViTForImageClassification.from_pretrained('{out}')"),
    'timm': ("import timm, json\nfrom safetensors.torch import load_file\n"
             "cfg = json.load(open('{out}/config.json'))\n"
             "model = timm.create_model(cfg['architecture'], num_classes=cfg['num_classes'], "
             "**cfg['model_args'])\n"
             "model.load_state_dict(load_file('{out}/model.safetensors'))"),
    'npz': ("from sparse_vit_jax.checkpoints import load_pretrained\n"
            "# a model built with the widths of model.json, then:\n"
            "params, _ = load_pretrained('{out}/params.npz', target_params)\n"
            "# or with the run's config, which builds the model with these widths itself:\n"
            "# python -m sparse_vit_jax.main --config=CONFIG --config.stages=eval,prune \\\n"
            "#     --config.init_from={out}/params.npz   (or config.pretrained= to fine-tune it)"),
}


def model_card(src: str, fmt: str, out: str, flat: dict[str, np.ndarray], results: dict,
               numerics: str, ratio: float | None, notes: list[str], command: str,
               units_removed: bool = False, nm: str = '') -> str:
    """The export's README.md; `units_removed`: the weakest units went, so the run's accuracy
    is not this model's."""
    s = shape_of(flat)
    caveat = ['- measured on the source model, before its weakest heads and MLP units were '
              'removed: not this model\'s accuracy (unmeasured; fine-tune and evaluate it)'
              ] if units_removed else []
    table, kernels, every = sparsity_lines(flat)
    config = results.get('config', {})
    data = config.get('data', {}).get('name', 'unknown')
    scope = config.get('prune', {}).get('scope', 'global')
    act, _, eps = ACTIVATIONS[numerics]
    pruning = (f'{scope} magnitude at {ratio}' if ratio else f'N:M {nm} (along each kernel\'s '
               'inputs)' if nm else 'none at export')
    return '\n'.join([
        f'# ViT exported by sparse_vit_jax ({fmt})', '',
        f'- source: `{src}` (dataset: {data})',
        f'- pruning: {pruning}',
        f'- widths: hidden {s["hidden_size"]}, {s["num_layers"]} blocks, heads per block '
        f'{s["num_heads"]}, MLP units per block {s["mlp_dim"]}, patch {s["patch_size"]}, '
        f'image {s["image_size"]}, {s["num_classes"]} classes',
        f'- numerics: {numerics!r} (GELU {act}, LayerNorm epsilon {eps:g})',
        *[f'- {n}' for n in notes], '',
        '## Accuracy (from the run\'s results.json)', '', *caveat,
        accuracy_lines(results, ratio, nm), '',
        '## Sparsity', '', f'- kernels: {kernels:.4f} zero; all parameters: {every:.4f} zero',
        '', table, '', '## Load', '', '```python',
        HOW_TO_LOAD[fmt].format(out=out), '```', '', '## Command', '', '```',
        command, '```', ''])


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata={'format': 'pt'})


def export(src: str, fmt: str, out: str, *, structured: bool = False,
           ratio: float | None = None, numerics: str = 'auto', heads: float = 0.0,
           mlp_units: float = 0.0, unit_scope: str = 'layerwise', command: str = '',
           nm: str | None = None) -> str:
    """Writes OUT (a new directory) and returns a one-line summary."""
    for name, r in (('--heads', heads), ('--mlp-units', mlp_units)):
        if not 0.0 <= r < 1.0:
            raise UserError(f'{name} must be in [0, 1), got {r}')
    if unit_scope not in ('layerwise', 'global'):
        raise UserError(f"--unit-scope must be 'layerwise' or 'global', got {unit_scope!r}")
    if fmt not in FORMATS:
        raise UserError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
    if numerics != 'auto' and numerics not in ACTIVATIONS:
        raise UserError(f'unknown numerics {numerics!r}; choose auto or one of '
                        f'{", ".join(ACTIVATIONS)}')
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise UserError(f'--prune must be in [0, 1), got {ratio}')
    if nm is not None:
        from sparse_vit_jax.pruning import parse_nm
        if ratio:
            raise UserError('--prune and --nm both prune (by magnitude, or N:M): choose one')
        try:
            n, m = parse_nm(nm)
        except UserError as e:
            raise UserError(f'--nm: {e}') from None
        nm = f'{n}:{m}'
    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f'{out} already exists and is not an empty directory; choose a new one '
                        '(nothing is overwritten)')
    if not dst.parent.is_dir():
        raise UserError(f'the parent directory of {out} does not exist; create it first')
    flat, results = read_source(src)
    if numerics == 'auto':
        numerics = results.get('numerics') or 'jax'
    if ratio:
        flat = prune(flat, ratio, results.get('config', {}))
    if nm:
        try:
            flat = prune_nm(flat, n, m, results.get('config', {}))
        except UserError as e:  # a kernel whose inputs m does not divide, a 1-D tensor
            raise UserError(f'--nm {nm}: {e}') from None
    notes: list[str] = []
    if heads or mlp_units:
        flat, note = remove_weakest_units(flat, heads, mlp_units, unit_scope)
        notes.append(note)
    if structured:
        flat, more = remove_empty_units(flat, fmt)
        notes += more
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f'.{dst.name}.') as tmp:
        t = Path(tmp) / 'out'
        t.mkdir()
        if fmt == 'npz':
            save_npz(t / 'params.npz', flat)
            s = shape_of(flat)
            (t / 'model.json').write_text(json.dumps({**s, 'numerics': numerics}, indent=1))
        else:
            config, tensors = (to_hf if fmt == 'hf' else to_timm)(flat, numerics)
            _safetensors(t / 'model.safetensors', tensors)
            (t / 'config.json').write_text(json.dumps(config, indent=1))
        card = model_card(src, fmt, out, flat, results, numerics, ratio, notes, command,
                          units_removed=bool(heads or mlp_units), nm=nm or '')
        (t / 'README.md').write_text(card)
        for f in t.iterdir():
            f.chmod(0o644)
        t.chmod(0o755)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(t, dst)
    zero = sparsity_lines(flat)[1]
    return (f'wrote {out} ({fmt}): {sum(v.size for v in flat.values())} parameters, kernels '
            f'{zero:.4f} zero' + ''.join(f'; {n}' for n in notes))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog='python -m sparse_vit_jax.export', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src', help='a run directory or our .npz')
    ap.add_argument('out', help='a new directory')
    ap.add_argument('--format', required=True, help=' | '.join(FORMATS))
    ap.add_argument('--structured', action='store_true',
                    help='remove emptied heads and MLP units where the format allows')
    ap.add_argument('--heads', type=float, default=0.0, metavar='RATIO',
                    help='remove this fraction of the heads with the smallest kernel norms')
    ap.add_argument('--mlp-units', type=float, default=0.0, metavar='RATIO',
                    help='remove this fraction of the MLP units with the smallest kernel norms')
    ap.add_argument('--unit-scope', default='layerwise',
                    help='layerwise (each block loses the same fraction) | global')
    ap.add_argument('--prune', type=float, default=None, metavar='RATIO',
                    help='prune by global magnitude first (the run\'s pool and scope)')
    ap.add_argument('--nm', default=None, metavar='N:M',
                    help='prune to N:M instead (e.g. 2:4), over the run\'s pool\'s kernels')
    ap.add_argument('--numerics', default='auto',
                    help='auto (the run\'s) | jax | timm | hf | asyml: GELU and LayerNorm eps')
    args = ap.parse_args(argv)
    skip_tpu_without_chips()  # before JAX starts its backends: no libtpu errors on GPU/CPU hosts
    command = ' '.join(['python -m sparse_vit_jax.export', *argv])
    print(run_cli(lambda: export(args.src, args.format, args.out, structured=args.structured,
                                 ratio=args.prune, numerics=args.numerics, heads=args.heads,
                                 mlp_units=args.mlp_units, unit_scope=args.unit_scope,
                                 command=command, nm=args.nm)))


if __name__ == '__main__':
    main()
