"""The model: official names and shapes, variants, options."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FakeDevice

from sparse_vit_jax.checkpoints import flatten
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import VARIANTS, abstract_params, create_model, init_params
from sparse_vit_jax.models.dropout import Dropout

OFFICIAL_PARAM_COUNTS = {  # from the ViT paper, Table 1 (ImageNet-1k heads, 224 px)
    'ViT-B_16': 86.6e6, 'ViT-L_16': 304.3e6, 'ViT-H_14': 632.0e6}


def test_official_tree_names_and_shapes():
    flat = flatten(abstract_params(create_model('ViT-B_16', num_classes=10), 384))
    blk = 'Transformer/encoderblock_11/'
    expect = {
        'embedding/kernel': (16, 16, 3, 768), 'cls': (1, 1, 768),
        'Transformer/posembed_input/pos_embedding': (1, 577, 768),
        blk + 'LayerNorm_0/scale': (768,), blk + 'LayerNorm_1/bias': (768,),
        blk + 'MultiHeadDotProductAttention_0/query/kernel': (768, 12, 64),
        blk + 'MultiHeadDotProductAttention_0/value/bias': (12, 64),
        blk + 'MultiHeadDotProductAttention_0/out/kernel': (12, 64, 768),
        blk + 'MlpBlock_0/Dense_0/kernel': (768, 3072),
        blk + 'MlpBlock_0/Dense_1/kernel': (3072, 768),
        'Transformer/encoder_norm/scale': (768,), 'head/kernel': (768, 10),
    }
    for k, shape in expect.items():
        assert flat[k].shape == shape, k
    assert len(flat) == 2 + 1 + 1 + 2 + 2 + 12 * 16  # emb cls pos encoder_norm head, blocks


@pytest.mark.parametrize('name', list(OFFICIAL_PARAM_COUNTS))
def test_param_counts_match_paper(name):
    flat = flatten(abstract_params(create_model(name, num_classes=1000), 224))
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    assert abs(n - OFFICIAL_PARAM_COUNTS[name]) / OFFICIAL_PARAM_COUNTS[name] < 0.005


def test_every_variant_builds_and_pre_logits():
    for name in VARIANTS:
        m = create_model(name, num_classes=7, representation_size=16)
        p = abstract_params(m, 2 * VARIANTS[name]['patch_size'])
        assert p['pre_logits']['kernel'].shape[1] == 16
        assert p['head']['kernel'].shape == (16, 7)


def test_attention_probs_only_when_asked():
    m = create_model('testing', num_classes=3)
    p = init_params(m, 16)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    logits, state = m.apply({'params': p}, x, capture_attention=(1,), mutable=['intermediates'])
    probs = state['intermediates']['Transformer']['encoderblock_1'][
        'MultiHeadDotProductAttention_0']['attention_probs'][0]
    assert probs.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert 'encoderblock_0' not in state['intermediates']['Transformer']
    _, state = m.apply({'params': p}, x, mutable=['intermediates'])
    assert state == {} or not jax.tree.leaves(state)
    np.testing.assert_array_equal(logits, m.apply({'params': p}, x))


def test_dropout_and_bf16():
    m = create_model('testing', num_classes=3, dropout_rate=0.5)
    p = init_params(m, 16)
    p['head']['kernel'] = jax.random.normal(jax.random.key(3), p['head']['kernel'].shape)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    a = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(1)})
    b = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(2)})
    assert not np.allclose(a, b)
    e = m.apply({'params': p}, x)
    bf = create_model('testing', num_classes=3, dropout_rate=0.5, dtype=jnp.bfloat16)
    e16 = bf.apply({'params': p}, x)
    assert e16.dtype == jnp.float32
    np.testing.assert_allclose(e16, e, atol=0.05 * float(jnp.abs(e).max()))


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_dropout_bytes_keeps_the_rounded_rate_and_the_mean(impl):
    """Kept share and scale against the formula: kept iff the byte < round(0.9 * 256) = 230,
    scaled by 256 / 230; over 10**6 draws the share is within 5 standard deviations of
    230/256, which is 0.0016 from 0.9."""
    n = 1_000_000
    x = jnp.full((n + 3,), 3.0)  # not a whole number of 32-bit words
    y = np.asarray(Dropout(0.1, 'bytes').apply({}, x, deterministic=False,
                                               rngs={'dropout': jax.random.key(0, impl=impl)}))
    kept = y != 0
    p = 230 / 256
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y[kept], 3.0 * 256 / 230, rtol=1e-6)
    assert abs(y.mean() - 3.0) < 5 * 3.0 * np.sqrt((1 - p) / p / n)
    np.testing.assert_array_equal(Dropout(0.1, 'bytes').apply({}, x, deterministic=True), x)
    for rate in (1.0, 0.999):  # all dropped; 0.999 rounds to 0/256
        assert not np.asarray(Dropout(rate, 'bytes').apply(
            {}, x, deterministic=False, rngs={'dropout': jax.random.key(0)})).any()
    np.testing.assert_array_equal(Dropout(0.001, 'bytes').apply(  # rounds to 256/256: all kept
        {}, x, deterministic=False, rngs={'dropout': jax.random.key(0)}), x)


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_dropout_flax_is_flax_dropout(impl):
    """The default is flax's nn.Dropout bit for bit: the same key, the same output."""
    x = jax.random.normal(jax.random.key(1), (4, 65, 96))
    rngs = {'dropout': jax.random.key(7, impl=impl)}
    np.testing.assert_array_equal(
        Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs),
        nn.Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs))


def all_eqns(jaxpr):
    """A jaxpr's equations, those of the jaxprs inside them (jit, remat...) included."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    yield from all_eqns(inner)


def test_dropout_impls_shrink_the_random_words_the_step_draws():
    """What the GPU saves: the random bytes drawn for a training forward pass are 4 per
    element with flax's draws, 1 with bytes, and none with the hash, which takes its two words
    from each call's key (read off the jaxpr's random_bits: 32-bit words, as XLA's GPU
    generator writes them whatever width it is asked for)."""
    x = jnp.ones((2, 16, 16, 3))

    m = create_model('testing', num_classes=3, dropout_rate=0.1)
    p = init_params(m, 16)

    def drawn_bytes(impl: str) -> int:
        model = m.clone(dropout_impl=impl)
        jaxpr = jax.make_jaxpr(lambda k: model.apply({'params': p}, x, train=True,
                                                     rngs={'dropout': k}))(jax.random.key(0))
        return sum(e.params['bit_width'] // 8 * math.prod(e.params['shape'])
                   for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == 'random_bits')

    # What the dropouts see: the embedding's output; per block, two residual branches and
    # the MLP's hidden layer.
    tokens, width, mlp = 2 * 17, m.hidden_size, m.mlp_dim
    elements = tokens * width * (1 + 2 * m.num_layers) + tokens * mlp * m.num_layers
    assert [drawn_bytes(i) for i in ('flax', 'bytes', 'hash')] == [4 * elements, elements, 0]


@pytest.mark.parametrize('approximate', [True, False])
def test_gelu_is_jax_gelu_with_the_derivative_of_the_formula(approximate):
    """Forward: jax.nn.gelu bit for bit (fp32 and bf16); with sigmoid_form (the tanh
    approximation's), the float64 numpy formula within fp32 rounding, and within half a bf16
    step of it (one rounding, from float32). Gradient, both forms: the numpy float64
    derivative of the GELU formula (central differences), within fp32 rounding; the backward
    pass keeps the input only."""
    from scipy.special import erf

    from sparse_vit_jax.models.gelu import gelu

    def formula(z):
        if approximate:
            return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))

    x = np.linspace(-6, 6, 2001).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        xs = jnp.asarray(x, dtype)
        np.testing.assert_array_equal(np.asarray(gelu(xs, approximate), np.float32),
                                      np.asarray(jax.nn.gelu(xs, approximate), np.float32))
        got = np.asarray(gelu(xs, approximate, True), np.float64)
        exact = formula(np.asarray(xs, np.float64))
        if not approximate:  # the sigmoid form is the tanh approximation's only
            np.testing.assert_array_equal(got, np.asarray(jax.nn.gelu(xs, False), np.float64))
        elif dtype == jnp.float32:
            np.testing.assert_allclose(got, exact, rtol=2e-6, atol=2e-7)
        else:  # rounded once: within half a bf16 step (at most 2**-8 of the value)
            assert np.all(np.abs(got - exact) <= np.abs(exact) * 2 ** -8)

    z, eps = x.astype(np.float64), 1e-6
    want = (formula(z + eps) - formula(z - eps)) / (2 * eps)
    for sigmoid_form in (False, True):
        f = functools.partial(gelu, approximate=approximate, sigmoid_form=sigmoid_form)
        got = jax.vmap(jax.grad(f))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
        _, vjp = jax.vjp(f, jnp.asarray(x))
        assert [r.shape for r in jax.tree.leaves(vjp)] == [x.shape]


def test_the_mlp_computes_gelu_in_the_sigmoid_form_where_a_dropout_follows():
    """gelu_form='sigmoid', training with dropout: the tanh GELU written as x sigmoid(2u)
    (kept out of cuBLASLt's GELU epilogue on GPUs, see `gelu`), in every block; evaluation
    and training without dropout keep jax.nn.gelu's tanh form, which the epilogue may take."""
    x = jnp.ones((2, 16, 16, 3))
    m = create_model('testing', num_classes=3, dropout_rate=0.1)
    p = init_params(m, 16)

    def primitives(model, train):
        jaxpr = jax.make_jaxpr(lambda k: model.apply({'params': p}, x, train=train,
                                                     rngs={'dropout': k}))(jax.random.key(0))
        names = [e.primitive.name for e in all_eqns(jaxpr.jaxpr)]
        return names.count('logistic'), names.count('tanh')

    sig = m.clone(gelu_form='sigmoid')
    assert primitives(sig, True) == (m.num_layers, 0)
    assert primitives(sig, False) == (0, m.num_layers)
    assert primitives(sig.clone(dropout_rate=0.0), True) == (0, m.num_layers)
    assert primitives(sig.clone(gelu_approximate=False), True) == (0, 0)
    assert primitives(m, True) == (0, m.num_layers)  # 'tanh', the model's default


def test_softmax_and_reduce_against_numpy():
    """softmax_and_reduce with the paper's penalty: the probabilities (in the logits' dtype)
    and the penalty (in float32) are float64 numpy's, and the gradient is the numpy formula
    of softmax's backward pass, dlogits = p * (g - sum(g p)), with g the probabilities'
    cotangent plus the penalty's weight times its derivative 2p / (1 + p^2) / size; float32
    and bfloat16 logits. The backward pass keeps the logits and each row's log-sum-exp only."""
    from sparse_vit_jax.models.attention import softmax_and_reduce
    from sparse_vit_jax.sparsity import attention_penalty
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 3, 5, 7)).astype(np.float32)
    g_probs = rng.normal(0, 1, logits.shape).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        lj = jnp.asarray(logits, dtype)
        x = np.asarray(lj.astype(jnp.float32), np.float64)  # the logits as the model has them
        e = np.exp(x - x.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        probs, penalty = softmax_and_reduce(lj, attention_penalty)
        assert probs.dtype == dtype and penalty.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(probs, np.float64), p,
                                   rtol=1e-6 if dtype == jnp.float32 else 2 ** -8, atol=1e-7)
        np.testing.assert_allclose(penalty, np.mean(np.log1p(p ** 2)), rtol=1e-6)

        def loss(z):
            q, r = softmax_and_reduce(z, attention_penalty)
            return jnp.sum(q.astype(jnp.float32) * g_probs) + 3.0 * r

        g = g_probs + 3.0 * 2 * p / (1 + p ** 2) / p.size
        want = p * (g - (g * p).sum(-1, keepdims=True))
        got = jax.grad(loss)(lj)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-6 if dtype ==
                                   jnp.float32 else 1e-2 * np.abs(want).max())
        _, vjp = jax.vjp(lambda z: softmax_and_reduce(z, attention_penalty), lj)
        assert sorted(r.shape for r in jax.tree.leaves(vjp)) == [(2, 3, 5, 1), logits.shape]


def test_bad_names_and_sizes():
    with pytest.raises(UserError, match='unknown model'):
        create_model('ViT-Q_16', num_classes=10)
    with pytest.raises(UserError, match='not divisible'):
        create_model('ViT-B_16', num_classes=10, image_size=100)


@pytest.mark.slow
def test_cudnn_attention_branch_computes_the_same_attention(monkeypatch):
    """The fused-attention branch's layout and scale, run here through XLA's kernel."""
    model = create_model('testing', num_classes=5, dtype=jnp.bfloat16)
    fused = create_model('testing', num_classes=5, dtype=jnp.bfloat16, attention_impl='cudnn')
    params = init_params(model, 32)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                          params)  # a non-zero head, so the logits depend on the attention
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    calls = []
    real = jax.nn.dot_product_attention

    def via_xla(*args, implementation=None, **kw):
        calls.append(implementation)
        return real(*args, implementation='xla', **kw)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', via_xla)
    want = jax.jit(model.apply)({'params': params}, x)
    got = jax.jit(fused.apply)({'params': params}, x)
    assert calls == ['cudnn', 'cudnn']  # both blocks took the fused branch
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05, rtol=0.05)
    assert float(jnp.abs(want).max()) > 0.1
    # probabilities asked for: that block falls back to the explicit attention
    calls.clear()
    jax.jit(lambda v: fused.apply(v, x, capture_attention=(1,), mutable=['intermediates']))(
        {'params': params})
    assert calls == ['cudnn']


@pytest.mark.parametrize('image_size', [16, 28])  # 17 and 50 tokens, padded to 64
def test_padded_fused_attention_equals_unpadded(image_size):
    """The fused path's padding (to a multiple of 64) and masking, run with XLA's kernel in
    float32: the logits of the exact attention within 1e-5 (and the gradient at 17 tokens)."""
    exact = create_model('testing', num_classes=5)
    padded = create_model('testing', num_classes=5, attention_impl='padded_xla')
    params = init_params(exact, image_size)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    x = jax.random.normal(jax.random.key(1), (3, image_size, image_size, 3))
    want, got = (np.asarray(jax.jit(m.apply)({'params': params}, x)) for m in (exact, padded))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0.1
    if image_size != 16:
        return
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, x) ** 2)))(params)
             for m in (exact, padded)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_fused_attention_masks_padded_keys_against_numpy():
    """Against a float64 numpy softmax(q k^T) v over the real tokens only: 17 of 64, the
    padded ones filled with large values that would dominate if they were attended."""
    from sparse_vit_jax.models.attention import fused_attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 17, 3, 8)).astype(np.float32) for _ in range(3))
    padded = [np.concatenate([t, np.full((2, 47, 3, 8), 30.0, np.float32)], axis=1)
              for t in (q, k, v)]
    got = np.asarray(fused_attention(*padded, 'xla', 17))
    logits = np.einsum('bqhd,bkhd->bhqk', q.astype(np.float64), k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), v)
    assert got.shape == (2, 64, 3, 8)
    np.testing.assert_allclose(got[:, :17], want, atol=1e-5)


@pytest.mark.slow
def test_fused_path_ignores_what_the_kernel_leaves_in_padded_rows(monkeypatch):
    """A kernel that leaves NaN in the padded rows of its output and of its gradients (cuDNN
    leaves them unspecified): the model's logits and every parameter gradient stay those of
    the exact attention (fp32, 1e-5), so neither the output projection nor any weight or bias
    gradient reads a padded row."""
    exact = create_model('testing', num_classes=5)
    fused = create_model('testing', num_classes=5, attention_impl='padded_xla')
    params = init_params(exact, 16)  # 17 tokens, padded to 64
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    real = jax.nn.dot_product_attention

    def nan_rows(t, n):
        return t.at[:, n:].set(jnp.nan)

    def leaves_nan(q, k, v, *, query_seq_lengths, **kw):
        n = int(query_seq_lengths[0])

        @jax.custom_vjp
        def attend(q, k, v):
            return jnp.concatenate([real(q[:, :n], k[:, :n], v[:, :n], **kw),
                                    jnp.full_like(q[:, n:], jnp.nan)], axis=1)

        def fwd(q, k, v):
            return attend(q, k, v), (q, k, v)

        def bwd(res, g):
            _, vjp = jax.vjp(lambda *t: real(*(a[:, :n] for a in t), **kw), *res)
            return tuple(nan_rows(d, n) for d in vjp(g[:, :n]))

        attend.defvjp(fwd, bwd)
        return attend(q, k, v)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', leaves_nan)
    want, got = (np.asarray(m.apply({'params': params}, x)) for m in (exact, fused))
    np.testing.assert_allclose(got, want, atol=1e-5)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, x) ** 2))(params)
             for m in (exact, fused)]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                            jax.tree.leaves(grads[1])):
        assert np.isfinite(np.asarray(b)).all(), path
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=str(path))


@pytest.fixture
def tpu_interpreted():
    """Pallas TPU kernels run through Pallas' TPU interpreter on this CPU: the kernel's own
    program (blocks, online softmax, segment masks), not its Mosaic compilation."""
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():
        yield


def test_pallas_attention_masks_padded_keys_against_numpy(tpu_interpreted):
    """Against a float64 numpy softmax(q k^T) v over the real tokens only (17 of 128)."""
    from sparse_vit_jax.models.attention import pallas_attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 17, 3, 8)).astype(np.float32) for _ in range(3))
    got = np.asarray(jax.jit(pallas_attention)(q, k, v))
    logits = np.einsum('bqhd,bkhd->bhqk', q.astype(np.float64), k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), v)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # Pallas' TPU interpreter on the CPU
def test_pallas_attention_equals_exact_alone_and_sharded_over_a_mesh(tpu_interpreted):
    """The model with attention_impl='pallas': fp32 logits and gradients within 1e-5 of the
    exact attention; over a mesh of 8 devices (the kernel per device, shard_map over the
    batch) the same logits again."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    exact = create_model('testing', num_classes=5)
    pallas = exact.clone(attention_impl='pallas')
    params = init_params(exact, 16)  # 17 tokens, padded to 128
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    want, got = (np.asarray(jax.jit(m.apply)({'params': params}, x)) for m in (exact, pallas))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0.1
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, x) ** 2)))(params)
             for m in (exact, pallas)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)

    mesh = Mesh(np.array(jax.devices()), ('data',))
    assert mesh.size == 8
    sharded = pallas.clone(mesh=mesh)
    apply = jax.jit(sharded.apply, in_shardings=(NamedSharding(mesh, P()),
                                                 NamedSharding(mesh, P('data'))))
    assert 'shard_map' in str(jax.make_jaxpr(sharded.apply)({'params': params}, x))
    np.testing.assert_allclose(np.asarray(apply({'params': params}, x)), want, atol=1e-5)


def test_auto_choices_on_this_cpu():
    from sparse_vit_jax.models import attention_impl, compute_dtype, dropout_impl, gelu_form
    assert jax.default_backend() == 'cpu'
    assert compute_dtype('auto') == jnp.float32 and compute_dtype('bfloat16') == jnp.bfloat16
    assert attention_impl('auto', jnp.bfloat16, 64) == 'xla'
    assert attention_impl('padded_xla', jnp.float32, 64) == 'padded_xla'
    assert dropout_impl('auto') == 'flax' and dropout_impl('hash') == 'hash'
    assert gelu_form('auto') == 'tanh' and gelu_form('sigmoid') == 'sigmoid'


H200 = FakeDevice('gpu', 'NVIDIA H200', '9.0')
A100 = FakeDevice('gpu', 'NVIDIA A100-SXM4-80GB', '8.0')
T4 = FakeDevice('gpu', 'Tesla T4', '7.5')
RTX_2080 = FakeDevice('gpu', 'NVIDIA GeForce RTX 2080 Ti', '7.5')  # Turing, named NVIDIA
MI300 = FakeDevice('gpu', 'AMD Instinct MI300X', 'gfx942')
TPU = FakeDevice('tpu', 'TPU v5 lite')


@pytest.mark.parametrize('device,head,dtype,want', [
    (H200, 64, 'bfloat16', 'cudnn'), (A100, 64, 'bfloat16', 'cudnn'),
    (A100, 80, 'bfloat16', 'cudnn'),        # ViT-H/14's heads
    (A100, 160, 'bfloat16', 'xla'), (H200, 160, 'bfloat16', 'cudnn'),  # 128 / 256 at most
    (H200, 264, 'bfloat16', 'xla'), (H200, 36, 'bfloat16', 'xla'),    # a multiple of 8
    (H200, 64, 'float32', 'xla'),           # cuDNN's flash attention is 16-bit
    (T4, 64, 'bfloat16', 'xla'), (RTX_2080, 64, 'bfloat16', 'xla'),   # before Ampere
    (MI300, 64, 'bfloat16', 'xla'), (TPU, 64, 'bfloat16', 'xla')])
def test_auto_attention_is_fused_only_where_cudnn_runs_it(device, head, dtype, want):
    """cuDNN's support matrix: compute capability 8.0 or newer, 16-bit, head dims multiples
    of 8 up to 128 (256 from 9.0); elsewhere XLA's attention instead of a refused kernel."""
    from sparse_vit_jax.models import attention_impl, compute_dtype, cudnn_refusal
    assert attention_impl('auto', compute_dtype(dtype), head, device) == want
    assert attention_impl('cudnn', jnp.float32, head, device) == 'cudnn'  # asked for: as asked
    assert (cudnn_refusal(head, device) == '') == (want == 'cudnn' or dtype == 'float32')


@pytest.mark.parametrize('device,want', [(H200, 'hash'), (T4, 'hash'), (MI300, 'hash'),
                                         (TPU, 'flax')])
def test_auto_dropout_hashes_on_gpus(device, want):
    from sparse_vit_jax.models import dropout_impl
    assert dropout_impl('auto', device) == want
    assert dropout_impl('bytes', device) == 'bytes'


@pytest.mark.parametrize('device,want', [(H200, 'sigmoid'), (MI300, 'sigmoid'), (TPU, 'tanh')])
def test_auto_gelu_form_is_sigmoid_on_gpus(device, want):
    from sparse_vit_jax.models import gelu_form
    assert gelu_form('auto', device) == want
    assert gelu_form('tanh', device) == 'tanh'


def test_build_model_makes_auto_choices_for_the_mesh_devices():
    """The config's 'auto' keys resolve for the devices of the mesh the model runs on (an
    H200 here, compiled for from this CPU), not for JAX's first device."""
    from types import SimpleNamespace

    from sparse_vit_jax.configs import base_config
    from sparse_vit_jax.experiment import build_model
    c = base_config()
    c.model.name, c.model.image_size, c.model.dtype = 'testing', 16, 'auto'
    on_gpu = build_model(c, 3, 'jax', SimpleNamespace(devices=np.array([H200], dtype=object)))
    assert (on_gpu.dtype, on_gpu.attention_impl, on_gpu.dropout_impl, on_gpu.gelu_form) == (
        jnp.bfloat16, 'cudnn', 'hash', 'sigmoid')
    here = build_model(c, 3, 'jax')
    assert (here.dtype, here.attention_impl, here.dropout_impl, here.gelu_form) == (
        jnp.float32, 'xla', 'flax', 'tanh')


def test_cudnn_asked_for_where_it_cannot_run_is_one_line(monkeypatch, tmp_path):
    """model.attention_impl=cudnn on a GPU before Ampere: refused before anything is built."""
    from sparse_vit_jax.configs import base_config
    from sparse_vit_jax.experiment import Experiment
    c = base_config()
    c.model.attention_impl, c.model.dtype = 'cudnn', 'bfloat16'
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(jax, 'devices', lambda *a: [T4])
    with pytest.raises(UserError, match=r"^model.attention_impl=cudnn: cuDNN's fused attention "
                       r'needs an NVIDIA GPU of compute capability 8.0 \(Ampere\) or newer; '
                       r'Tesla T4 is 7.5; use model.attention_impl=auto or xla$'):
        Experiment.create(c, tmp_path)


def test_auto_dtype_is_bfloat16_where_it_is_fast():
    from sparse_vit_jax.models import compute_dtype
    fast = {d.device_kind: compute_dtype('auto', d) == jnp.bfloat16
            for d in (H200, A100, T4, RTX_2080, MI300, TPU)}
    assert fast == {'NVIDIA H200': True, 'NVIDIA A100-SXM4-80GB': True, 'Tesla T4': False,
                    'NVIDIA GeForce RTX 2080 Ti': False, 'AMD Instinct MI300X': True,
                    'TPU v5 lite': True}


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_parameters_and_gradients(remat):
    plain = create_model('testing', num_classes=5, dropout_rate=0.1)
    again = create_model('testing', num_classes=5, dropout_rate=0.1, remat=remat)
    params = init_params(plain, 16)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    assert jax.tree.structure(init_params(again, 16)) == jax.tree.structure(params)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

    def loss(p, m):
        y, st = m.apply({'params': p}, x, train=True, capture_attention=(1,),
                        rngs={'dropout': jax.random.key(2)}, mutable=['intermediates'])
        return jnp.sum(y ** 2) + sum(jnp.sum(a ** 2) for a in jax.tree.leaves(st))

    g0, g1 = (jax.jit(jax.grad(loss), static_argnums=1)(params, m) for m in (plain, again))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('remat, runs', [('none', 1), ('dots', 1), ('full', 2)])
def test_remat_dots_keeps_the_cudnn_attention_forward(monkeypatch, remat, runs):
    """The gradient's program (traced, not compiled: no GPU here) runs each block's cuDNN
    attention forward once under remat 'dots' (its outputs are kept), twice under 'full'."""
    from helpers import equations
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # traced as on a GPU

    class CudnnVersion:
        @staticmethod
        def cudnn_get_version() -> int:
            return 91000

    monkeypatch.setattr(cudnn, 'cuda_versions', CudnnVersion)
    model = create_model('testing', num_classes=5, dtype=jnp.bfloat16, attention_impl='cudnn',
                         remat=remat, dropout_rate=0.0)
    params = abstract_params(model, 32)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    loss = lambda p, x: model.apply({'params': p}, x, train=True).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, x)
    names = [e.primitive.name for e in equations(jaxpr.jaxpr)]
    assert names.count('dot_product_attention_bwd_wrapper') == model.num_layers
    assert names.count('dot_product_attention_fwd_wrapper') == runs * model.num_layers


@pytest.mark.parametrize('remat,runs', [('dots', 1), ('full', 2)])
def test_remat_dots_keeps_the_pallas_attention_forward(remat, runs):
    """The same for the Pallas TPU kernel (traced), also run per device over a mesh."""
    from helpers import equations
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()), ('data',))
    for m in (None, mesh):
        model = create_model('testing', num_classes=5, dtype=jnp.bfloat16,
                             attention_impl='pallas', remat=remat, dropout_rate=0.0, mesh=m)
        x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
        loss = lambda p, x, model=model: model.apply({'params': p}, x, train=True).sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(abstract_params(model, 32), x)
        kernels = [e.params['jaxpr'].debug_info.func_name for e in equations(jaxpr.jaxpr)
                   if e.primitive.name == 'pallas_call']
        assert kernels.count('_flash_attention_dq_kernel') == model.num_layers
        assert kernels.count('_flash_attention_kernel') == runs * model.num_layers


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
def test_cudnn_bf16_logits_agree_with_xla_attention():
    """Where a GPU is present: the padded cuDNN path against XLA's attention in bf16."""
    xla = create_model('ViT-Ti_16', num_classes=10, dtype=jnp.bfloat16)
    fused = xla.clone(attention_impl='cudnn')
    params = init_params(xla, 384)
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    x = jax.random.uniform(jax.random.key(1), (16, 384, 384, 3), minval=-1, maxval=1)
    a, b = (np.asarray(jax.jit(m.apply)({'params': params}, x)) for m in (fused, xla))
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(b).max())
