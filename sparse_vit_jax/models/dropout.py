"""Inverted dropout, three ways to draw its mask (`Dropout(rate, impl)`).

* 'flax': flax's nn.Dropout bit for bit (one float draw per element from JAX's PRNG).
* 'bytes': one random byte per element, cut from the PRNG's 32-bit words.
* 'hash': a counter-based hash of each element's index, computed where the mask is used.

On a GPU the PRNG's words are written to memory by XLA's RngBitGenerator kernels and read
back, and the boolean mask is kept for the backward pass: hashing instead removes 30% of the
bytes XLA's fusions move in a ViT-B/16 step at 384 px (an H200 compile,
benchmarks/gpu_compile.py), for some integer work per element. 'hash' draws
nothing: each element's 32-bit draw is `lowbias32(k + i * g)`, i the element's index in the
array and (k, g) made from two words of the call's key (`key_words`, `hash_key`), so XLA fuses
the draw into the kernel that applies the mask, and the backward pass recomputes it from
(k, g) instead of keeping a mask (a custom VJP); compiled for an H200, every call's (k, g)
comes out of one kernel, and no call has a kernel of its own. That is SplitMix's construction
(Steele, Lea and Flood, OOPSLA 2014: a Weyl sequence with a random odd increment, through a
bijective mixer) in 32 bits, with Wellons' lowbias32 mixer (hash-prospector). Within a
call, no two elements share a draw (a bijection of distinct counters); calls differ through
their words. Arrays of 2**32 elements or more add a second round keyed by the leading index.
Its draws are the same on every backend and every mesh, and do not depend on the PRNG
implementation beyond the two words.

'bytes' and 'hash' keep an element with probability round(keep * 2**bits) / 2**bits and scale
kept elements by the inverse of that exact probability, multiplied in float32 at least, so the
expectation is unchanged ('hash' draws the configured rate to within 2**-32; 'bytes' draws 0.1
as 26/256 = 0.1016).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DROPOUT_IMPLS = ('flax', 'bytes', 'hash')
_FLAT_LIMIT = 2**32  # arrays this large split their counter at the leading axis


def lowbias32(x: jax.Array) -> jax.Array:
    """Wellons' lowbias32: a bijection of uint32 with low avalanche bias (two multiplies)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_key(words: jax.Array) -> jax.Array:
    """The hash's (k, g) from two uint32 words: g is the second made odd and, if its bits have
    fewer than 12 transitions, flipped at alternate bits (SplittableRandom's mixGamma rule;
    idempotent, since the flip leaves 32 - n transitions). Without the rule, words with
    g = 1 or g = -1 fail the tests' chi-square of the draws' top byte."""
    odd = words | np.array([0, 1], np.uint32)
    flat = jax.lax.population_count(odd ^ (odd >> 1)) < 12
    return odd ^ jnp.where(flat & np.array([False, True]), np.uint32(0xAAAAAAAA), np.uint32(0))


def hash_draws(words: jax.Array, shape: tuple[int, ...], *,
               flat_limit: int = _FLAT_LIMIT) -> jax.Array:
    """Uniform uint32 draws of `shape` from two uint32 words: lowbias32(k + i * g) for the
    row-major index i, (k, g) = hash_key(words). Arrays of `flat_limit` elements or more index
    within the leading axis and add a second round keyed by the leading index, so no counter
    wraps."""
    return _draws(hash_key(words), shape, flat_limit)


def _draws(key: jax.Array, shape: tuple[int, ...], flat_limit: int = _FLAT_LIMIT
           ) -> jax.Array:
    k, g = key[0], key[1]
    split = math.prod(shape) >= flat_limit and len(shape) > 1
    first = 1 if split else 0
    if (counted := math.prod(shape[first:])) >= flat_limit:
        where = ' per leading index' if split else ''
        raise ValueError(f'hash dropout indexes fewer than {flat_limit} elements{where}; '
                         f'{shape} has {counted}')
    index = jnp.zeros(shape, jnp.uint32)  # row-major, from static strides
    stride = 1
    for axis in range(len(shape) - 1, first - 1, -1):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    x = lowbias32(k + index * g)
    if split:
        rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
        x = lowbias32(x ^ (rows * g + (k ^ np.uint32(0x9E3779B9))))
    return x


def _threshold(rate: float) -> int:
    """Draws below this keep their element: round((1 - rate) * 2**32), at most 2**32 - 1."""
    return min(round((1.0 - rate) * 2**32), 2**32 - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hash_dropout(x: jax.Array, words: jax.Array, rate: float) -> jax.Array:
    """Drops each element of `x` with probability `rate` (0 < rate < 1), by `hash_draws`; the
    gradient recomputes the mask from the hash's key instead of keeping it."""
    return _masked(x, hash_key(words), rate)


def _masked(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    threshold = _threshold(rate)
    keep = _draws(key, x.shape) < np.uint32(threshold)
    return jax.lax.select(keep, _scale(x, 2**32 / threshold), jnp.zeros_like(x))


def _scale(x: jax.Array, factor: float) -> jax.Array:
    """x * factor, multiplied in float32 at least: bfloat16 would round 1/0.9 to 1.109."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(wide) * np.asarray(factor, wide)).astype(x.dtype)


def _hash_dropout_fwd(x: jax.Array, words: jax.Array, rate: float):
    key = hash_key(words)  # kept, so the backward pass does not apply the rule again
    return _masked(x, key, rate), key


def _hash_dropout_bwd(rate: float, key: jax.Array, g: jax.Array):
    # The barrier keeps XLA from merging this mask with the forward pass's and keeping it.
    return _masked(g, jax.lax.optimization_barrier(key), rate), None


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


def key_words(key: jax.Array) -> jax.Array:
    """The hash's two words: the first two of the call's own key. flax folds a fresh key in
    for every call (with Threefry, or rbg's two Threefry halves), so its words are already
    random; drawing two more with `jax.random.bits` would cost rbg a generator kernel per
    call."""
    return jax.random.key_data(key).reshape(-1)[:2]


class Dropout(nn.Module):
    """Inverted dropout with the mask drawn by `impl` (see the module's docstring)."""

    rate: float
    impl: str = 'flax'

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        if self.impl == 'flax':  # flax's draws, bit for bit
            keep = 1.0 - self.rate
            mask = jax.random.bernoulli(self.make_rng('dropout'), keep, x.shape)
            return jax.lax.select(mask, x / keep, jnp.zeros_like(x))
        if self.impl == 'hash':
            if _threshold(self.rate) == 0:
                return jnp.zeros_like(x)
            return hash_dropout(x, key_words(self.make_rng('dropout')), self.rate)
        if self.impl != 'bytes':
            raise ValueError(f'unknown dropout impl {self.impl!r}; one of {DROPOUT_IMPLS}')
        keep = round((1.0 - self.rate) * 256)
        if keep == 256:  # the rate rounds to 0
            return x
        if keep == 0:
            return jnp.zeros_like(x)
        # Bytes cut from 32-bit words: XLA's GPU generator writes 32-bit words whatever
        # width it is asked for.
        words = jax.random.bits(self.make_rng('dropout'), (-(-x.size // 4),), jnp.uint32)
        draws = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:x.size]
        return jax.lax.select(draws.reshape(x.shape) < np.uint8(keep), _scale(x, 256 / keep),
                              jnp.zeros_like(x))
