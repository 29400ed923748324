"""Sparsity regularisers against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import create_model, init_params
from sparse_vit_jax.objective import make_loss_fn
from sparse_vit_jax.selection import PAPER_POOL, select, selected_paths
from sparse_vit_jax.sparsity import add_l1_penalty, attention_penalty, l1_proximal, resolve_layers


def random_attention(rng, shape):
    logits = rng.standard_normal(shape) * 3
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_penalty_value_and_gradient_against_numpy():
    a = random_attention(np.random.default_rng(0), (2, 3, 7, 7))
    value = np.mean(np.log1p(a ** 2))
    grad = 2 * a / (1 + a ** 2) / a.size
    np.testing.assert_allclose(attention_penalty(jnp.asarray(a, jnp.float32)), value, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(attention_penalty)(jnp.asarray(a, jnp.float32)), grad,
                               rtol=1e-5)


def test_penalty_prefers_uniform_attention():
    n = 577
    uniform = jnp.full((1, 1, n, n), 1.0 / n)
    one_hot = jnp.eye(n)[None, None]
    u, o = float(attention_penalty(uniform)), float(attention_penalty(one_hot))
    assert u < o
    np.testing.assert_allclose(o, np.log(2) / n, rtol=1e-5)   # 0.01 * S ~ 1.2e-5
    np.testing.assert_allclose(u, np.log1p(1 / n ** 2), rtol=1e-4)


def test_layers_and_zero_weight_compiles_to_plain_step():
    assert resolve_layers('last', 12) == (11,)
    assert resolve_layers('all', 3) == (0, 1, 2)
    assert resolve_layers([0, -1], 4) == (0, 3)
    for bad in ('first', [12], []):
        with pytest.raises(UserError):
            resolve_layers(bad, 12)
    model = create_model('testing', num_classes=3)
    params = init_params(model, 16)
    b = {'image': jnp.zeros((2, 16, 16, 3)), 'label': jnp.zeros(2, jnp.int32)}
    hlo = lambda f: jax.jit(lambda p: jax.grad(lambda q: f(q, b, None, False)[0])(p)
                            ).lower(params).as_text()
    plain = hlo(make_loss_fn(model))
    assert hlo(make_loss_fn(model, 0.0, 'all')) == plain
    assert hlo(make_loss_fn(model, 0.01, 'all')) != plain


def test_loss_penalty_matches_manual_last_block():
    model = create_model('testing', num_classes=3)
    params = init_params(model, 16, jax.random.key(1))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    y = jnp.array([0, 2])
    loss, aux = make_loss_fn(model, 0.5, 'last')(params, {'image': x, 'label': y}, None, False)
    logits, st = model.apply({'params': params}, x, capture_attention=(1,),
                             mutable=['intermediates'])
    a = np.asarray(st['intermediates']['Transformer']['encoderblock_1'][
        'MultiHeadDotProductAttention_0']['attention_probs'][0], np.float64)
    lp = np.asarray(logits, np.float64)
    ce = np.mean(np.log(np.exp(lp).sum(-1)) - lp[np.arange(2), [0, 2]])
    np.testing.assert_allclose(loss, ce + 0.5 * np.mean(np.log1p(a ** 2)), rtol=1e-5)


def test_top_k_correct_against_numpy_and_only_in_evaluation():
    from sparse_vit_jax.objective import top_k_correct
    logits = np.asarray(jax.random.normal(jax.random.key(3), (64, 20)))
    labels = np.asarray(jax.random.randint(jax.random.key(4), (64,), 0, 20))
    for k in (1, 5):
        top = np.argsort(-logits, axis=1)[:, :k]
        want = [float(y in row) for y, row in zip(labels, top)]
        np.testing.assert_array_equal(top_k_correct(logits, labels, k), want)
        assert 0 < np.mean(want) < 1
    # fewer classes than k: always a hit; a tie at the k-th place counts as one
    assert top_k_correct(jnp.array([[3., 1., 2.]]), jnp.array([1]), 5).tolist() == [1.0]
    tie = jnp.array([[4., 3., 2., 2., 1.]])
    assert top_k_correct(tie, jnp.array([3]), 3).tolist() == [1.0]
    assert top_k_correct(tie, jnp.array([4]), 3).tolist() == [0.0]
    model = create_model('testing', num_classes=3)
    params = init_params(model, 16)
    b = {'image': jnp.zeros((2, 16, 16, 3)), 'label': jnp.zeros(2, jnp.int32)}
    loss_fn = make_loss_fn(model)
    assert 'correct5' in loss_fn(params, b, None, False)[1]
    assert 'correct5' not in loss_fn(params, b, jax.random.key(0), True)[1]


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_penalty_sown_reduced_has_the_gradients_of_the_penalty_of_the_sown_probs(remat):
    """The loss sows the penalty itself (`reduce_attention`, whose backward pass recomputes
    the probabilities); its value and every parameter gradient equal those of the penalty
    computed from the sown probabilities, with and without rematerialisation."""
    from sparse_vit_jax.sparsity import penalty_from_intermediates
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    y = jnp.array([0, 2])
    model = create_model('testing', num_classes=3, remat=remat)
    params = init_params(model, 16, jax.random.key(1))

    def from_probs(p):
        logits, st = model.apply({'params': p}, x, capture_attention=(0, 1),
                                 mutable=['intermediates'])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 100.0 * penalty_from_intermediates(st['intermediates'], (0, 1))

    loss_fn = make_loss_fn(model, 100.0, 'all')  # a weight at which the penalty's gradient counts
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(p, {'image': x, 'label': y}, None, False), has_aux=True)(params)
    want_loss, want = jax.value_and_grad(from_probs)(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # float32 rounding differs between the two (the probabilities as exp(x - lse) or e / sum)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, want)
    assert float(jnp.abs(grads['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_0']['query']['kernel']).max()) > 0


def params_and_grads():
    model = create_model('testing', num_classes=3)
    params = init_params(model, 16, jax.random.key(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape), params)
    return params, grads


def test_pool_selection():
    params, _ = params_and_grads()
    paths = selected_paths(params, select(params))
    assert 'embedding/kernel' in paths and 'head/kernel' in paths
    assert 'Transformer/encoderblock_1/LayerNorm_1/scale' in paths
    assert not any(p.endswith('bias') or 'pos_embedding' in p or 'encoder_norm' in p or
                   p == 'cls' for p in paths)
    assert len(paths) == 1 + 2 * 8 + 1
    with pytest.raises(UserError, match='matches no parameter'):
        select(params, r'nothing/.*')


def test_l1_subgradient_against_numpy():
    params, grads = params_and_grads()
    sel = select(params)
    sched = optax.linear_schedule(0.1, 0.3, 2)
    tx = add_l1_penalty(sched)
    state = tx.init(params)
    for step in range(2):
        out, state = tx.update(grads, state, params)
        lam = float(sched(step))
        for g, w, o, s in zip(*(jax.tree.leaves(t) for t in (grads, params, out, sel))):
            expect = np.asarray(g) + (lam * np.sign(np.asarray(w)) if s else 0)
            np.testing.assert_allclose(o, expect, rtol=1e-6)


def test_l1_proximal_against_numpy_and_exact_zeros():
    params, grads = params_and_grads()
    lr, lam = 0.1, 0.5
    tx = optax.chain(optax.sgd(lr), l1_proximal(lam, lr))
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    sel = select(params)
    for w, g, n, s in zip(*(jax.tree.leaves(t) for t in (params, grads, new, sel))):
        half = np.asarray(w, np.float64) - lr * np.asarray(g, np.float64)
        ref = np.sign(half) * np.maximum(np.abs(half) - lr * lam, 0) if s else half
        np.testing.assert_allclose(n, ref, atol=1e-6)
        if s:
            assert np.array_equal(np.asarray(n) == 0, ref == 0)


def test_l1_under_jit_with_sharded_params_and_orbax_state(tmp_path):
    params, grads = params_and_grads()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    shard = lambda x: jax.device_put(x, NamedSharding(
        mesh, P('data') if x.ndim and x.shape[0] % len(jax.devices()) == 0 else P()))
    sp, sg = jax.tree.map(shard, params), jax.tree.map(shard, grads)
    tx = optax.chain(add_l1_penalty(0.01), optax.sgd(0.1, momentum=0.9), l1_proximal(0.1, 0.1))
    state = tx.init(sp)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    u_sharded, state = step(sg, state, sp)
    u_plain, _ = tx.update(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u_sharded), jax.tree.leaves(u_plain)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
        mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        restored = mngr.restore(1, args=ocp.args.StandardRestore(jax.tree.map(
            ocp.utils.to_shape_dtype_struct, state)))
    assert int(restored[0].count) == 1
    assert type(restored[0]) is type(state[0])


def train_zero_fraction(lam, steps=40):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.repeat(np.pad(d.images[:256, :, :, None] / 8.0 - 1, ((0, 0), (4, 4), (4, 4), (0, 0))),
                  3, axis=-1).astype(np.float32)
    y = d.target[:256]
    model = create_model('testing', num_classes=10, dropout_rate=0.0)
    params = init_params(model, 16, jax.random.key(0))
    lr = 3e-3
    tx = optax.chain(optax.adam(lr), l1_proximal(lam, lr))
    loss_fn = make_loss_fn(model)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: loss_fn(q, {'image': x, 'label': y}, None, False)[0])(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    pool = [w for w, s in zip(jax.tree.leaves(params), jax.tree.leaves(select(params))) if s]
    return sum(int((np.asarray(w) == 0).sum()) for w in pool) / sum(w.size for w in pool)


@pytest.mark.slow
def test_proximal_zero_fraction_grows_with_strength():
    fractions = [train_zero_fraction(lam) for lam in (0.0, 0.3, 1.0, 3.0)]
    assert fractions[0] == 0.0
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions


def test_negative_strength_rejected():
    with pytest.raises(ValueError):
        add_l1_penalty(-1.0)
    assert PAPER_POOL
