"""Pruning against torch.nn.utils.prune and numpy references, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import needs_torch, torch

from sparse_vit_jax.checkpoints import flatten, unflatten
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import abstract_params, create_model
from sparse_vit_jax.pruning import (
    apply_masks,
    evaluate_at_ratios,
    evaluate_nm,
    gradual_pruning,
    keep_masks,
    magnitude_masks,
    nm_masks,
    parse_nm,
    polynomial_sparsity,
    prune_structured,
    prune_zero_units,
    ratio_text,
    sparsity_report,
    unit_scores,
)
from sparse_vit_jax.selection import select


def random_vit(name='ViT-Ti_16', seed=0, size=32, **overrides):
    model = create_model(name, num_classes=10, **overrides)
    params = abstract_params(model, size)  # shapes only: every value is drawn below
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 0.05), params)


def pool_of(params, masks):
    fm, fp = flatten(masks), flatten(params)
    return {k: (np.asarray(fp[k]), np.asarray(v)) for k, v in fm.items() if v is not None}


def torch_masks(pool, ratio, scope):
    import torch.nn.utils.prune as tprune
    mods = {}
    for k, (w, _) in pool.items():
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(torch.from_numpy(w.copy()))
        mods[k] = m
    if scope == 'global':
        tprune.global_unstructured([(m, 'weight') for m in mods.values()],
                                   pruning_method=tprune.L1Unstructured, amount=ratio)
    else:
        for m in mods.values():
            tprune.l1_unstructured(m, 'weight', amount=ratio)
    return {k: m.weight_mask.numpy().astype(bool) for k, m in mods.items()}


@needs_torch
@pytest.mark.parametrize('scope', ['global', 'layerwise'])
def test_identical_to_torch_prune(scope):
    _, params = random_vit(num_layers=4)  # 1.8 M weights in the pool, 25 tensors
    ratios = [0.1, 0.5, 0.9]
    sweep = magnitude_masks(params, ratios, scope=scope)
    for ratio, masks in zip(ratios, sweep):
        pool = pool_of(params, masks)
        ref = torch_masks(pool, ratio, scope)
        for k, (w, ours) in pool.items():
            diff = ours != ref[k]
            if diff.any():  # only weights tied at the threshold may be ordered differently
                thr = np.abs(w[~ours]).max()
                assert (np.abs(w[diff]) == thr).all(), k
            assert (~ours).sum() == (~ref[k]).sum() or scope == 'global'
        assert sum((~m).sum() for _, m in pool.values()) == sum((~m).sum() for m in ref.values())


def test_exact_counts_with_ties_and_determinism():
    params = {'a': {'kernel': jnp.ones((7, 9))}, 'b': {'kernel': jnp.ones((5, 3))},
              'c': {'bias': jnp.ones(4)}}
    for ratio in (0.1, 0.25, 0.5, 0.77):
        masks = magnitude_masks(params, ratio, select=r'.*/kernel')
        k = round(ratio * 78)
        pruned = np.concatenate([~np.asarray(masks['a']['kernel']).ravel(),
                                 ~np.asarray(masks['b']['kernel']).ravel()])
        assert pruned.sum() == k
        assert pruned[:k].all() and not pruned[k:].any()  # ties pruned in pool order
        assert masks['c']['bias'] is None


def test_jit_traced_sparsity_and_idempotence():
    _, params = random_vit('testing')
    f = jax.jit(lambda p, s: magnitude_masks(p, s))
    for ratio in (0.0, 0.2, 0.6):
        eager = magnitude_masks(params, ratio)
        traced = f(params, jnp.float32(ratio))
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
            np.testing.assert_array_equal(a, b)
        pruned = apply_masks(params, eager)
        again = magnitude_masks(pruned, ratio)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(again)):
            np.testing.assert_array_equal(a, b)
        report = sparsity_report(pruned)
        assert report['zeros'] == round(ratio * report['size'])


def test_keep_masks_through_optimizer_steps():
    _, params = random_vit('testing')
    masks = magnitude_masks(params, 0.5)
    tx = keep_masks(optax.chain(optax.add_decayed_weights(1e-2), optax.adamw(1e-2)), masks)
    state = tx.init(params)  # params not pruned yet: the first update zeroes them
    for i in range(3):
        key = jax.random.key(i)
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        for w, m in pool_of(params, masks).values():
            assert (w[~m] == 0).all() and (w[m] != 0).mean() > 0.99


def test_the_configs_gradual_pruning_follows_the_cubic_schedule_in_optimizer_steps():
    """sparsity.gradual in the optimizer the main command builds: with 2 accumulated
    micro-batches per update, the pool's zero fraction after update t is numpy's
    s_f * (1 - (1 - p)^3), p = (t - start) / (end - start) clipped, start and end being
    fractions of the 8 updates."""
    from sparse_vit_jax.configs import base_config
    from sparse_vit_jax.optimizer import build_optimizer
    c = base_config()
    c.optimizer.name, c.optimizer.accumulate, c.schedule.name = 'sgd', 2, 'constant'
    g = c.sparsity.gradual
    g.sparsity, g.start, g.end, g.every_steps = 0.6, 0.25, 0.75, 1
    _, params = random_vit('testing')
    tx = build_optimizer(c, 8)  # 16 micro-steps
    state, step = tx.init(params), jax.jit(tx.update)
    for micro in range(16):
        key = jax.random.key(micro)
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        if micro % 2:
            t = micro // 2
            want = 0.6 * (1 - (1 - min(max((t - 2) / 4, 0), 1)) ** 3)
            np.testing.assert_allclose(sparsity_report(params)['fraction'], want,
                                       atol=1e-4, err_msg=f'update {t}')


def test_keep_zeros_keeps_the_starting_zeros_and_frees_an_untrained_tensor():
    """keep_zeros takes its masks from the weights it is initialised with: their exact zeros
    in the pool stay zero under AdamW with weight decay, every other pool weight moves, and a
    pool tensor that is zero throughout (a zero-initialised head) is trained, not frozen."""
    from sparse_vit_jax.pruning import keep_zeros
    _, params = random_vit('testing')
    rng = np.random.default_rng(1)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    pool = flatten(select(params))
    planted = {k: rng.random(v.shape) < 0.6 for k, v in flat.items() if pool[k]}
    flat = {k: np.where(planted[k], 0, v) if k in planted else v for k, v in flat.items()}
    flat['head/kernel'] = np.zeros_like(flat['head/kernel'])
    tx = keep_zeros(optax.adamw(1e-2, weight_decay=0.1))
    start = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    p, state, step = start, tx.init(start), jax.jit(tx.update)
    for i in range(3):
        grads = jax.tree.map(lambda w, i=i: jax.random.normal(jax.random.key(i), w.shape), p)
        updates, state = step(grads, state, p)
        p = optax.apply_updates(p, updates)
    after = {k: np.asarray(v) for k, v in flatten(p).items()}
    for k, zero in planted.items():
        if k == 'head/kernel':
            assert (after[k] != 0).all()
            continue
        assert (after[k][zero] == 0).all(), k
        assert (after[k][~zero] != flat[k][~zero]).all(), k


def test_gradual_pruning_schedule():
    for t in (0, 3, 5, 9, 10, 12):
        p = min(max((t - 2) / 8, 0), 1)
        np.testing.assert_allclose(polynomial_sparsity(t, 0.8, 2, 10), 0.8 * (1 - (1 - p) ** 3),
                                   rtol=1e-6)
    _, params = random_vit('testing')
    tx = gradual_pruning(optax.sgd(1e-3), 0.8, start_step=2, end_step=10, frequency=2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    fractions = []
    for _ in range(12):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        fractions.append(sparsity_report(params)['fraction'])
    assert fractions[0] == 0 and all(a <= b for a, b in zip(fractions, fractions[1:]))
    np.testing.assert_allclose(fractions[-1], 0.8, atol=1e-4)


@pytest.mark.parametrize('start,end,frequency', [(2, 9, 3), (4, 4, 5), (0, 6, 100)])
def test_gradual_pruning_reaches_its_final_sparsity_at_the_end_step(start, end, frequency):
    """Masks are made at start + k * frequency and at the end step even where the two do not
    line up (start == end: one-shot pruning there): the pool's zero fraction after each
    update is numpy's schedule evaluated at the last update made so far."""
    _, params = random_vit('testing')
    tx = gradual_pruning(optax.sgd(1e-3), 0.7, start_step=start, end_step=end,
                         frequency=frequency)
    state, step = tx.init(params), jax.jit(tx.update)
    made = None
    for t in range(end + 3):
        if start <= t <= end and ((t - start) % frequency == 0 or t == end):
            made = t
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        want = 0.0
        if made is not None:
            p = 1.0 if end == start else (made - start) / (end - start)
            want = 0.7 * (1 - (1 - p) ** 3)
        np.testing.assert_allclose(sparsity_report(params)['fraction'], want, atol=1e-4,
                                   err_msg=f'step {t}')
    assert made == end


def test_the_configs_gradual_pruning_ends_at_its_final_sparsity_when_end_is_the_last_step():
    """end = 1.0 means the last optimizer step: its update still prunes (a step count of
    total_steps would never be reached)."""
    from sparse_vit_jax.configs import base_config
    from sparse_vit_jax.optimizer import build_optimizer
    c = base_config()
    c.optimizer.name, c.schedule.name = 'sgd', 'constant'
    g = c.sparsity.gradual
    g.sparsity, g.start, g.end, g.every_steps = 0.5, 0.5, 1.0, 4
    _, params = random_vit('testing')
    tx = build_optimizer(c, 7)
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(7):
        updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(sparsity_report(params)['fraction'], 0.5, atol=1e-4)


def test_nm_masks_against_numpy():
    _, params = random_vit('testing')
    masks = nm_masks(params, 2, 4)
    fp = flatten(params)
    for k, m in flatten(masks).items():
        if m is None:
            continue
        w = np.abs(np.asarray(fp[k]))
        ndim_in = 1 if k.split('/')[-2] in ('query', 'key', 'value') else w.ndim - 1
        g = w.reshape(-1, 4, int(np.prod(w.shape[ndim_in:])))
        mm = np.asarray(m).reshape(g.shape)
        assert (mm.sum(axis=1) == 2).all(), k
        kept_min = np.where(mm, g, np.inf).min(axis=1)
        pruned_max = np.where(mm, -np.inf, g).max(axis=1)
        assert (kept_min >= pruned_max).all(), k
    assert flatten(masks)['Transformer/encoderblock_0/LayerNorm_0/scale'] is None


def test_structured_equals_masked_dense():
    model, params = random_vit('testing')
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    att = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/'
    mlp = 'Transformer/encoderblock_{}/MlpBlock_0/'
    for n in ('query', 'key', 'value'):
        flat[att.format(0) + n + '/kernel'][:, 1] = 0        # head 1 of block 0
    flat[att.format(0) + 'out/kernel'][1] = 0
    flat[mlp.format(1) + 'Dense_0/kernel'][:, ::3] = 0        # a third of block 1's units
    flat[mlp.format(1) + 'Dense_1/kernel'][::3] = 0
    from sparse_vit_jax.checkpoints import unflatten
    dense = unflatten(flat)
    small_model, small = prune_zero_units(model, dense)
    assert small_model.num_heads == (1, 2) and small_model.mlp_dim == (64, 64 - 22)
    np.testing.assert_allclose(small_model.apply({'params': small}, x),
                               model.apply({'params': dense}, x), atol=1e-5)


@pytest.mark.slow
def test_prune_structured_counts_and_scores():
    model, params = random_vit('ViT-Ti_16')
    m2, p2 = prune_structured(model, params, head_ratio=1 / 3, mlp_ratio=0.5)
    assert m2.num_heads == (2,) * 12 and m2.mlp_dim == (384,) * 12
    out = m2.apply({'params': p2}, jnp.zeros((1, 32, 32, 3)))
    assert out.shape == (1, 10)
    mg, pg = prune_structured(model, params, head_ratio=0.25, mlp_ratio=0.5, scope='global')
    assert sum(mg.num_heads) == 36 - 9 and sum(mg.mlp_dim) == 12 * 768 // 2
    # the kept MLP units of block 0 are the largest by independent numpy norm
    d0 = np.asarray(params['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel'])
    d1 = np.asarray(params['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_1']['kernel'])
    norms = np.linalg.norm(np.concatenate([d0, d1.T], axis=0), axis=0)
    small = p2['Transformer']['encoderblock_0']['MlpBlock_0']
    kept = np.concatenate([np.asarray(small['Dense_0']['kernel']),
                           np.asarray(small['Dense_1']['kernel']).T])
    assert np.isclose(np.linalg.norm(kept, axis=0).min(), np.sort(norms)[384], rtol=1e-5)


def test_errors():
    _, params = random_vit('testing')
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r'\[0, 1\)'):
            magnitude_masks(params, bad)
    with pytest.raises(UserError, match='matches no parameter'):
        magnitude_masks(params, 0.5, select=r'nothing')
    with pytest.raises(UserError, match='empty'):
        magnitude_masks(params, 0.5, select=jax.tree.map(lambda _: False, params))
    masks = magnitude_masks(params, 0.5)
    with pytest.raises(UserError, match='do not match'):
        apply_masks({'head': params['head']}, masks)
    bad = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
    bad['head']['kernel'] = jnp.ones((3, 3), bool)
    with pytest.raises(UserError, match='head/kernel has shape'):
        apply_masks(params, bad)
    assert select(params)


def test_evaluate_at_ratios_counts_zeros_and_logs_every_digit_of_a_ratio():
    _, params = random_vit('testing')
    host = jax.tree.map(np.asarray, params)
    lines = []
    rows, report = evaluate_at_ratios(params, [0.125, 0.5],
                                      lambda p: {'accuracy': 1.0, 'loss': 0.0}, log=lines.append)
    sel = jax.tree.leaves(select(params))
    pool = sum(x.size for x, s in zip(jax.tree.leaves(host), sel) if s)
    total = sum(x.size for x in jax.tree.leaves(host))
    for row, ratio in zip(rows, (0.125, 0.5)):
        assert row['total_params'] == total
        # pruned = floor/round of ratio * pool, whatever the rounding: within one weight
        assert abs((total - row['nonzero_params']) - ratio * pool) <= 1
        assert abs(row['pool_sparsity'] - ratio) <= 1 / pool
    assert [line.split(' (')[0] for line in lines] == ['prune 0.125', 'prune 0.50']
    assert '## ratio 0.125 (global)' in report
    assert [ratio_text(r) for r in (0.1, 0.25, 0.125, 0.05, 0.999)] == [
        '0.10', '0.25', '0.125', '0.05', '0.999']


def test_global_structured_removes_the_asked_count_when_a_block_is_all_weak():
    model, params = random_vit('ViT-Ti_16')  # 12 blocks x 3 heads, 768 MLP units
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    for n in ('query', 'key', 'value', 'out'):  # block 5's heads far weaker than any other
        flat[f'Transformer/encoderblock_5/MultiHeadDotProductAttention_0/{n}/kernel'] *= 1e-3
    params = unflatten(flat)
    heads, _ = unit_scores(params)
    m2, p2 = prune_structured(model, params, head_ratio=0.25, scope='global')
    assert sum(m2.num_heads) == 36 - 9 and m2.num_heads[5] == 1
    # numpy reference: block 5 keeps its strongest head; the other 26 are the strongest
    # of the remaining 33 heads across blocks
    flat_scores = np.concatenate(heads)
    keep = {5 * 3 + int(np.argmax(heads[5]))}
    others = [i for i in np.argsort(-flat_scores) if i // 3 != 5]
    keep |= {int(i) for i in others[:26]}
    expect = [sum(1 for i in keep if i // 3 == b) for b in range(12)]
    assert list(m2.num_heads) == expect
    out = jax.eval_shape(m2.apply, {'params': p2}, jnp.zeros((1, 32, 32, 3)))  # shapes fit
    assert out.shape == (1, 10)
    # too few units to remove the asked count: every block keeps its minimum
    m3, _ = prune_structured(model, params, head_ratio=0.9, scope='global')
    assert m3.num_heads == (1,) * 12


def test_evaluate_nm_prunes_half_of_the_kernels_and_parses_only_n_below_m():
    _, params = random_vit('testing')
    host = {k: np.asarray(v) for k, v in flatten(params).items()}
    lines = []
    rows, report = evaluate_nm(params, ['2:4'], lambda p: {'accuracy': 1.0, 'loss': 0.0},
                               log=lines.append)
    kernels = [k for k in pool_of(params, nm_masks(params, 2, 4))]
    assert all(host[k].ndim >= 2 for k in kernels) and not any('scale' in k for k in kernels)
    pool = sum(host[k].size for k in kernels)
    total = sum(v.size for v in host.values())
    assert rows[0]['pattern'] == '2:4' and rows[0]['ratio'] == 0.5
    assert rows[0]['nonzero_params'] == total - pool // 2  # random normals: no zero before
    assert rows[0]['pool_sparsity'] == 0.5
    assert lines[0].startswith('prune 2:4 (N:M) | accuracy 1.0000') and '## N:M 2:4' in report
    assert parse_nm(' 1:8') == (1, 8)
    for bad in ('4:4', '0:4', '3:2', '2', '2:x', '-1:4', '2:4:8'):
        with pytest.raises(UserError, match='is not "n:m"'):
            parse_nm(bad)
    with pytest.raises(UserError, match='LayerNorm_0/scale is 1-D'):
        nm_masks(params, 2, 4, select=[r'.*encoderblock_0/LayerNorm_0/scale'])
