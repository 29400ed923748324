"""The attention kernels a ViT block calls, as functions of (q, k, v) or of the logits.

* `softmax_and_reduce`: the exact softmax and a penalty of it in one VJP that keeps only the
  logits (the block whose probabilities the paper's penalty reads);
* `fused_attention`: `jax.nn.dot_product_attention` (cuDNN's flash kernel, or XLA's) on tokens
  padded to the kernel's alignment, the padding masked through its sequence lengths, with
  `pad_tokens` and `zero_padded_grad` for the caller's projections;
* `pallas_attention`: JAX's Pallas flash-attention kernel for TPUs, padded the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

# Fused attention kernels take sequence lengths that are multiples of this (cuDNN refuses
# 577 = 24 * 24 + 1 tokens, the paper's 384 px): tokens are padded up to it and masked.
FUSED_ALIGN = 64
FUSED_IMPLS = {'cudnn': 'cudnn', 'padded_xla': 'xla'}  # attention_impl -> jax.nn kernel
PALLAS_ALIGN = 128  # the Pallas TPU kernel's block along the sequence


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_and_reduce(logits: jax.Array, reduce: Callable[[jax.Array], jax.Array]
                       ) -> tuple[jax.Array, jax.Array]:
    """(softmax over the last axis, in the logits' dtype; reduce of it in float32): what an
    attention block whose probabilities a penalty reads computes. Differentiated by JAX, the
    probabilities (or their exponentials) are kept in float32 for the backward pass and read
    back four times: on a GPU, ViT-B/16's exact block at 384 px moves about 3.9 GB in those
    kernels (benchmarks/gpu_compile.py). Here only the logits, in their own dtype, and each
    row's log-sum-exp are kept, and the backward pass recomputes the probabilities in the
    kernels that read the logits; the forward pass computes them once more, after the
    log-sum-exp, instead of keeping the exponentials its sum took."""
    probs, _ = _probs_and_lse(logits)
    return probs.astype(logits.dtype), reduce(probs)


def _probs_and_lse(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True))
    return jnp.exp(x - lse), lse


def _softmax_and_reduce_fwd(logits: jax.Array, reduce: Callable[[jax.Array], jax.Array]
                            ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    probs, lse = _probs_and_lse(logits)
    return (probs.astype(logits.dtype), reduce(probs)), (logits, lse)


def _softmax_and_reduce_bwd(reduce: Callable[[jax.Array], jax.Array],
                            res: tuple[jax.Array, jax.Array], g: tuple[jax.Array, jax.Array]
                            ) -> tuple[jax.Array]:
    logits, lse = res
    g_probs, g_reduced = g

    def probs_and_cotangent(lse: jax.Array) -> tuple[jax.Array, jax.Array]:
        probs = jnp.exp(logits.astype(jnp.float32) - lse)
        return probs, g_probs.astype(jnp.float32) + jax.vjp(reduce, probs)[1](g_reduced)[0]

    # Each pass recomputes both from the logits: behind the barriers the expressions are not
    # the forward pass's nor each other's, which XLA would merge, keeping float32 arrays of
    # the probabilities' size between kernels after all.
    probs, cot = probs_and_cotangent(jax.lax.optimization_barrier(lse))
    dot = jnp.sum(cot * probs, axis=-1, keepdims=True)
    lse, dot = jax.lax.optimization_barrier((lse, dot))
    probs, cot = probs_and_cotangent(lse)
    return ((probs * (cot - dot)).astype(logits.dtype),)


softmax_and_reduce.defvjp(_softmax_and_reduce_fwd, _softmax_and_reduce_bwd)


def pad_tokens(align: int, *ts: jax.Array) -> tuple[int, list[jax.Array]]:
    """(pad, ts with their token axis 1 zero-padded up to a multiple of `align`)."""
    pad = -ts[0].shape[1] % align
    if not pad:
        return 0, list(ts)
    return pad, [jnp.pad(t, ((0, 0), (0, pad)) + ((0, 0),) * (t.ndim - 2)) for t in ts]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def zero_padded_grad(x: jax.Array, length: int) -> jax.Array:
    """Identity whose gradient has its token rows from `length` on set to zero, in place (an
    update of the padded rows only, not a copy): a fused kernel's gradients of padded tokens
    are unspecified (cuDNN leaves some unwritten), and must reach no weight or bias gradient."""
    return x


def _zero_padded_grad_fwd(x: jax.Array, length: int) -> tuple[jax.Array, None]:
    return x, None


def _zero_padded_grad_bwd(length: int, _: None, g: jax.Array) -> tuple[jax.Array]:
    if length == g.shape[1]:
        return (g,)
    zeros = jnp.zeros((g.shape[0], g.shape[1] - length, *g.shape[2:]), g.dtype)
    return (jax.lax.dynamic_update_slice(g, zeros, (0, length) + (0,) * (g.ndim - 2)),)


zero_padded_grad.defvjp(_zero_padded_grad_fwd, _zero_padded_grad_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                    length: int) -> jax.Array:
    """softmax(q k^T) v for (B, T, H, Dh) inputs (q pre-scaled) by `jax.nn.dot_product_attention`,
    of which the first `length` tokens are real: the others are padding up to the kernel's
    alignment, masked out through its sequence lengths (never attended). The output's
    padded rows are unspecified."""
    if length == q.shape[1]:
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh | None = None,
                     align: int = PALLAS_ALIGN) -> jax.Array:
    """softmax(q k^T) v for (B, N, H, Dh) inputs (q pre-scaled) by JAX's Pallas TPU
    flash-attention kernel, with N padded up to a multiple of `align`: the padding is a
    segment of its own, so real queries never attend to it, and padded queries are sliced off.

    XLA does not partition a Pallas kernel, so over a `mesh` it runs on each device's share of
    the batch (shard_map); a batch the mesh does not divide (initialisation's one image) runs
    whole."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu

    b, n = q.shape[:2]
    pad, padded = pad_tokens(align, q, k, v)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in padded)  # (B, H, N, Dh), the kernel's layout
    segments = jnp.broadcast_to((jnp.arange(n + pad) >= n).astype(jnp.int32), (b, n + pad))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, s: jax.Array) -> jax.Array:
        return tpu.flash_attention(q, k, v, segment_ids=tpu.SegmentIds(s, s), sm_scale=1.0)

    if mesh is not None and mesh.size > 1 and b % mesh.size == 0:
        batch = P(mesh.axis_names)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(batch,) * 4, out_specs=batch,
                               check_vma=False)
    return attend(q, k, v, segments).transpose(0, 2, 1, 3)[:, :n]
