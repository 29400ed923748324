"""Hashed dropout masks (models/dropout.py) against a numpy reference and statistical checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from sparse_vit_jax.models.dropout import Dropout, hash_draws, hash_dropout


def np_lowbias32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32, written from its published constants in numpy uint32 arithmetic."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def np_draws(words, shape, flat_limit=2**32):
    """The reference: lowbias32(k + i * g), i the row-major index (within each leading index,
    then a second round keyed by it, when the array has flat_limit elements or more)."""
    k, g = int(words[0]), int(words[1]) | 1
    if bin(g ^ (g >> 1)).count('1') < 12:
        g ^= 0xAAAAAAAA
    size = int(np.prod(shape))
    if size < flat_limit:
        i = np.arange(size, dtype=np.uint64).reshape(shape)
        return np_lowbias32(((k + i * g) % 2**32).astype(np.uint32))
    rows = np.arange(shape[0], dtype=np.uint64).reshape(-1, *[1] * (len(shape) - 1))
    within = np.arange(size // shape[0], dtype=np.uint64).reshape(1, *shape[1:])
    first = np_lowbias32(((k + within * g) % 2**32).astype(np.uint32))
    key = ((rows * g + (k ^ 0x9E3779B9)) % 2**32).astype(np.uint32)
    return np_lowbias32(first ^ key)


WORDS = [(123456789, 987654321), (0, 0), (2**32 - 1, 2**31), (7, 0xAAAAAAAA)]


@pytest.mark.parametrize('words', WORDS)
def test_hash_draws_match_the_numpy_reference(words):
    w = jnp.asarray(words, jnp.uint32)
    for shape in [(1000,), (3, 17, 5), (2, 577, 96)]:
        np.testing.assert_array_equal(np.asarray(hash_draws(w, shape)), np_draws(words, shape))
    # Arrays past the counter's range split it at the leading axis (a small limit stands in
    # for 2**32 elements).
    np.testing.assert_array_equal(np.asarray(hash_draws(w, (6, 7, 9), flat_limit=64)),
                                  np_draws(words, (6, 7, 9), flat_limit=64))
    with pytest.raises(ValueError, match='per leading index'):
        hash_draws(w, (2, 40, 2), flat_limit=64)
    with pytest.raises(ValueError, match='fewer than 64 elements; '):
        hash_draws(w, (70,), flat_limit=64)


def test_hash_key_is_the_gamma_rule_and_idempotent():
    """hash_key against the rule written in Python integers; applied twice it changes nothing
    (the forward pass keeps the key it made, and the backward pass uses it as it is)."""
    from sparse_vit_jax.models.dropout import hash_key
    rng = np.random.default_rng(1)
    words = [*WORDS, *rng.integers(0, 2**32, (200, 2), dtype=np.uint64).tolist()]
    flipped = 0
    for k, w in words:
        g = int(w) | 1
        if bin(g ^ (g >> 1)).count('1') < 12:
            g, flipped = g ^ 0xAAAAAAAA, flipped + 1
        key = hash_key(jnp.asarray([k, w], jnp.uint32))
        assert np.asarray(key).tolist() == [int(k), g]
        np.testing.assert_array_equal(np.asarray(hash_key(key)), np.asarray(key))
    assert 3 <= flipped < 40  # the weak words above, and about 7% of random ones


def uniform01(draws: np.ndarray) -> np.ndarray:
    return draws.astype(np.float64) / 2**32


@pytest.mark.parametrize('words', WORDS)
def test_hash_draws_look_uniform_and_independent(words):
    """One call's 2**21 draws: each byte of the 32-bit draws uniform (chi-square over 256
    bins), no correlation between neighbours along each axis of a (32, 256, 256) array, nor
    with another call's draws; the weak increments (0, and alternating bits) included. With
    n draws an independent sample's correlation is within 5/sqrt(n) of 0 but for one in
    ~10**6; the chi-square's p-value is above 1e-6."""
    shape = (32, 256, 256)
    d = np.asarray(hash_draws(jnp.asarray(words, jnp.uint32), shape))
    for byte in range(4):
        counts = np.bincount(((d >> np.uint32(8 * byte)) & np.uint32(255)).ravel(),
                             minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-6, byte
    u = uniform01(d)
    other = uniform01(np.asarray(hash_draws(jnp.asarray([words[0] ^ 1, words[1]], jnp.uint32),
                                            shape)))
    pairs = [(u[..., 1:], u[..., :-1]), (u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, other)]
    for a, b in pairs:
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.size), r
    # The dropout mask of one element against its neighbour's: P(both kept) = 0.81.
    keep = u < 0.9
    both = (keep[..., 1:] & keep[..., :-1]).mean()
    assert abs(both - 0.81) < 5 * np.sqrt(0.81 * 0.19 / keep[..., 1:].size)


def test_hash_draws_differ_per_call_and_are_distinct_within_one():
    """A bijection of distinct counters: no repeated draw within a call; calls share few,
    whichever word differs (the increment's lowest bit is always set: (k, g) and (k, g ^ 1)
    are one key of the 63 bits)."""
    a = np.asarray(hash_draws(jnp.asarray([1, 2], jnp.uint32), (1 << 20,)))
    for other in ([1, 4], [2, 2], [1 << 31, 2]):
        b = np.asarray(hash_draws(jnp.asarray(other, jnp.uint32), (1 << 20,)))
        # Two independent samples of 2**20 share ~2**40 / 2**32 = 256 values.
        assert len(np.intersect1d(a, b)) < 2 * 256, other
    assert len(np.unique(a)) == a.size


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_hash_dropout_keeps_the_rate_and_the_mean(dtype):
    """Kept iff the draw < round(0.9 * 2**32), scaled by 2**32 over that threshold (1/0.9 to
    float32's precision): the share kept within 5 standard deviations of 0.9 and the kept
    values the reference's, in the input's dtype."""
    n = 1_000_003
    x = jnp.linspace(-3.0, 3.0, n, dtype=jnp.float32).astype(dtype)
    w = jnp.asarray([42, 4242], jnp.uint32)
    y = np.asarray(jax.jit(hash_dropout, static_argnums=2)(x, w, 0.1)).astype(np.float64)
    keep = np_draws((42, 4242), (n,)) < round(0.9 * 2**32)
    assert abs(keep.mean() - 0.9) < 5 * np.sqrt(0.09 / n)
    scale = np.float32(2**32 / round(0.9 * 2**32))  # multiplied in float32
    want = np.where(keep, np.asarray(x).astype(np.float32) * scale, np.float32(0))
    np.testing.assert_array_equal(y, np.asarray(jnp.asarray(want).astype(dtype), np.float64))


def test_hash_dropout_gradient_is_the_same_mask_recomputed():
    """The custom VJP keeps only the two words: the gradient is the cotangent through the
    reference mask and scale, under jit and under remat."""
    x = jax.random.normal(jax.random.key(0), (4, 33, 64))
    w = jnp.asarray([5, 6], jnp.uint32)
    ct = jax.random.normal(jax.random.key(1), x.shape)
    keep = np_draws((5, 6), x.shape) < round(0.8 * 2**32)
    want = np.where(keep, np.asarray(ct) * np.float32(2**32 / round(0.8 * 2**32)), 0)
    f = lambda x: jnp.vdot(hash_dropout(x, w, 0.2), ct)  # noqa: E731
    for g in (jax.grad(f), jax.jit(jax.grad(f)), jax.jit(jax.grad(jax.checkpoint(f)))):
        np.testing.assert_allclose(np.asarray(g(x)), want, rtol=1e-6)


def test_hash_dropout_is_the_same_on_any_mesh():
    """The draws index the whole array, so sharding the batch over 8 devices draws the
    same mask as one device does."""
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = jax.sharding.Mesh(devices, ('data',))
    x = jnp.ones((16, 65, 48))
    w = jnp.asarray([9, 10], jnp.uint32)
    one = np.asarray(jax.jit(hash_dropout, static_argnums=2)(x, w, 0.1))
    sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
    many = jax.jit(hash_dropout, static_argnums=2)(sharded, w, 0.1)
    assert many.sharding.spec == P('data')
    np.testing.assert_array_equal(np.asarray(many), one)


def test_hash_dropout_module_edges():
    x = jnp.arange(1.0, 1001.0)
    rngs = {'dropout': jax.random.key(3)}
    apply = lambda rate, det=False: np.asarray(Dropout(rate, 'hash').apply(  # noqa: E731
        {}, x, deterministic=det, rngs=rngs))
    np.testing.assert_array_equal(apply(0.5, det=True), x)
    np.testing.assert_array_equal(apply(0.0), x)
    assert not apply(1.0).any()
    y = apply(0.5)
    kept = y != 0
    assert 400 < kept.sum() < 600
    np.testing.assert_allclose(y[kept], 2 * np.asarray(x)[kept], rtol=1e-6)
    with pytest.raises(ValueError, match='unknown dropout impl'):
        Dropout(0.5, 'philox').apply({}, x, deterministic=False, rngs=rngs)


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg', 'unsafe_rbg'])
def test_hash_words_come_from_each_calls_own_key(impl):
    """The hash's words are the first two of the key flax folds in for the call: every call of
    a module gets its own, under each PRNG implementation, and they follow the step's key."""
    from sparse_vit_jax.models.dropout import key_words

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            return (Dropout(0.5, 'hash')(x, deterministic=False),
                    Dropout(0.5, 'hash')(x, deterministic=False))

    x = jnp.ones((4096,))
    key = jax.random.key(11, impl=impl)
    a, b = Twice().apply({}, x, rngs={'dropout': key})
    assert 0.45 < float((a == 0).mean()) < 0.55 and 0.45 < float((b == 0).mean()) < 0.55
    assert 0.4 < float(((a == 0) == (b == 0)).mean()) < 0.6  # independent masks
    again, _ = Twice().apply({}, x, rngs={'dropout': jax.random.key(12, impl=impl)})
    assert 0.4 < float(((a == 0) == (again == 0)).mean()) < 0.6
    np.testing.assert_array_equal(np.asarray(key_words(key)),
                                  np.asarray(jax.random.key_data(key)).reshape(-1)[:2])


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_hashed_masks_are_redrawn_alike_under_remat(remat):
    """A block rematerialised in the backward pass hashes the same masks again: the model's
    training-mode gradients with remat equal those without, and differ from another key's."""
    from sparse_vit_jax.models import create_model, init_params
    m = create_model('testing', num_classes=3, dropout_rate=0.3, dropout_impl='hash')
    p = init_params(m, 16)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))

    def grads(model, key):
        loss = lambda p: model.apply({'params': p}, x, train=True,  # noqa: E731
                                     rngs={'dropout': key}).sum()
        return jax.tree.leaves(jax.jit(jax.grad(loss))(p))

    plain, again = grads(m, jax.random.key(5)), grads(m.clone(remat=remat), jax.random.key(5))
    for a, b in zip(plain, again):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    other = grads(m, jax.random.key(6))
    assert any(not np.allclose(a, b) for a, b in zip(plain, other))
