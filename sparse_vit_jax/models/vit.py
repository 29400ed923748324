"""Vision Transformer in Flax linen, with the official checkpoints' parameter names.

The module tree mirrors google-research/vision_transformer (after
`flax.training.checkpoints.convert_pre_linen`), so loading the published `.npz`
files is a key/shape check. Two additions serve sparsity work:

* the post-softmax attention probabilities of chosen blocks are sown into the
  `intermediates` collection (``capture_attention``), so a loss can penalise
  them from the same forward pass; blocks not asked for keep nothing. Given
  ``reduce_attention`` (a penalty, say), a block sows that function of its
  probabilities instead, differentiated without keeping them (`softmax_and_reduce`);
* ``num_heads`` and ``mlp_dim`` may differ per block, so a structurally pruned
  parameter tree runs through the same model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_vit_jax.models.dropout import Dropout

Dtype = Any
IntOrPerBlock = int | Sequence[int]
# Fused attention kernels take sequence lengths that are multiples of this (cuDNN refuses
# 577 = 24 * 24 + 1 tokens, the paper's 384 px): tokens are padded up to it and masked.
FUSED_ALIGN = 64
FUSED_IMPLS = {'cudnn': 'cudnn', 'padded_xla': 'xla'}  # attention_impl -> jax.nn kernel
PALLAS_ALIGN = 128  # the Pallas TPU kernel's block along the sequence


def dots_and_fused_attention_saveable(prim: Any, *avals: Any, **params: Any) -> bool:
    """Remat policy 'dots': keep the matmul outputs and the fused attention kernel's outputs
    (its result, one (B, N, D) activation, and its softmax statistics). Without the second,
    the backward pass reruns every block's cuDNN or Pallas attention forward, about 11% of a
    block's forward FLOPs at 384 px (2*N*D against 12*D^2 multiply-adds per token). The
    Pallas kernel's custom_vjp is kept whole, with its residuals (not `gelu`'s)."""
    return (prim.name.startswith('dot_product_attention_fwd') or _is_pallas_call(prim, params)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


def _is_pallas_call(prim: Any, params: dict[str, Any]) -> bool:
    """A custom_vjp around a Pallas kernel (not `gelu`'s, whose output is cheap to recompute)."""
    return prim.name == 'custom_vjp_call' and any(
        e.primitive.name == 'pallas_call' for e in params['call_jaxpr'].jaxpr.eqns)


REMAT = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
         'dots': dots_and_fused_attention_saveable}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gelu(x: jax.Array, approximate: bool = True, sigmoid_form: bool = False) -> jax.Array:
    """`jax.nn.gelu` whose backward pass keeps only the input: differentiated by JAX, XLA
    keeps an intermediate of the forward pass as large as the MLP's hidden activations for
    the backward pass, about 1/17 of the bytes a ViT-B/16 step at 384 px moves on a GPU
    (benchmarks/gpu_compile.py); recomputing it from the input costs a few flops in a kernel
    that reads that input anyway. The derivative is computed in float32.

    sigmoid_form: the tanh approximation as x sigmoid(2u), in float32: the same function
    (the two differ by rounding) in a form that XLA's GPU matmul rewriter does not move into
    cuBLASLt's GELU epilogue. Where a dropout follows, that epilogue costs bytes: the matmul
    writes both the pre-activation (which the backward pass keeps) and the GELU, which the
    dropout's kernel reads back, one array of the MLP's width more per block than when the
    dropout's kernel computes the GELU from the pre-activation (2.5% of the bytes a ViT-B/16
    step at 384 px moves, in an H200 compile; a TPU v5e compile moves the same bytes either
    way). Without a dropout the epilogue saves bytes, and the MLP keeps the tanh form."""
    return _gelu(x, approximate, sigmoid_form)


def _gelu(x: jax.Array, approximate: bool, sigmoid_form: bool) -> jax.Array:
    if not (approximate and sigmoid_form):
        return jax.nn.gelu(x, approximate=approximate)
    # 0.5 x (1 + tanh(u)) = x sigmoid(2u). 2u is written otherwise than in `_gelu_bwd`: where
    # remat recomputes this in the backward pass, XLA would merge the two sigmoids and keep
    # the result in float32 between kernels (+12% bytes at batch 256 with remat 'dots').
    x32 = x.astype(jnp.float32)
    c = 2 * math.sqrt(2 / math.pi)
    return (x32 * jax.nn.sigmoid(x32 * (c + c * 0.044715 * x32 * x32))).astype(x.dtype)


def _gelu_fwd(x: jax.Array, approximate: bool, sigmoid_form: bool
              ) -> tuple[jax.Array, jax.Array]:
    return _gelu(x, approximate, sigmoid_form), x


def _gelu_bwd(approximate: bool, _: bool, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    x32 = x.astype(jnp.float32)
    # In sigmoids and erfc, which keep their precision in the tails where 1 + tanh and
    # 1 + erf cancel (the derivative at x = -5 is -2e-6, not 0).
    if approximate:  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = c (x + 0.044715 x^3)
        two_u = 2 * math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32 ** 3)
        s = jax.nn.sigmoid(two_u)
        d = s + x32 * s * jax.nn.sigmoid(-two_u) * (
            2 * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x32 ** 2))
    else:  # d/dx x Phi(x) = Phi(x) + x phi(x)
        d = (0.5 * jax.lax.erfc(-x32 * (1 / math.sqrt(2)))
             + x32 * jnp.exp(-0.5 * x32 * x32) * (1 / math.sqrt(2 * math.pi)))
    return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


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


def _pad_tokens(align: int, *ts: jax.Array) -> tuple[int, list[jax.Array]]:
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
    pad, padded = _pad_tokens(align, q, k, v)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in padded)  # (B, H, N, Dh), the kernel's layout
    segments = jnp.broadcast_to((jnp.arange(n + pad) >= n).astype(jnp.int32), (b, n + pad))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, s: jax.Array) -> jax.Array:
        return tpu.flash_attention(q, k, v, segment_ids=tpu.SegmentIds(s, s), sm_scale=1.0)

    if mesh is not None and mesh.size > 1 and b % mesh.size == 0:
        batch = P(mesh.axis_names)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(batch,) * 4, out_specs=batch,
                               check_vma=False)
    return attend(q, k, v, segments).transpose(0, 2, 1, 3)[:, :n]


def per_block(value: IntOrPerBlock, depth: int, name: str) -> tuple[int, ...]:
    """Expands an int to one value per block; checks a sequence's length."""
    if isinstance(value, int):
        return (value,) * depth
    value = tuple(int(v) for v in value)
    if len(value) != depth:
        raise ValueError(f'{name} has {len(value)} entries but the model has {depth} blocks')
    return value


class ProjectionParams(nn.Module):
    """Declares a DenseGeneral's kernel and bias (same names, shapes and init) without applying it.

    The attention applies its four projections itself so that query, key and
    value run as one matmul; the parameter tree stays the official one.
    """

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    fan_in: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        xavier = nn.initializers.xavier_uniform()
        flat = (self.fan_in, math.prod(self.kernel_shape) // max(self.fan_in, 1))
        kernel = self.param('kernel', lambda r, s: xavier(r, flat).reshape(s), self.kernel_shape)
        bias = self.param('bias', nn.initializers.zeros, self.bias_shape)
        return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with the official (D, H, Dh) / (H, Dh, D) kernel layout.

    Computed as one (B*N, D) x (D, 3*H*Dh) matmul for q/k/v (the three kernels
    are concatenated on the fly, which costs a copy of the weights, not of the
    activations) and head-major (B, H, N, Dh) attention, whose batched matmuls
    need no transposes; on CPU this is ~15% faster than three DenseGenerals and
    'bqhd,bkhd' einsums (benchmarks/train_step.py). impl='cudnn' runs the
    attention itself as cuDNN's fused kernel (GPU, bf16/fp16) wherever the
    probabilities are not needed (not sown, no attention dropout), on tokens padded
    to FUSED_ALIGN; impl='padded_xla' runs that same padding and masking with XLA's
    kernel (any device: it is how the fused path is checked without a GPU); impl='pallas'
    runs JAX's Pallas flash-attention kernel for TPUs the same way (tokens padded to
    PALLAS_ALIGN), per device over `mesh`.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_impl: str = 'flax'
    sow_probs: bool = False
    reduce_probs: Callable[[jax.Array], jax.Array] | None = None  # sown instead of the probs
    impl: str = 'xla'
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        b, n, d = x.shape
        h, k = self.num_heads, self.head_dim
        qkv = [ProjectionParams((d, h, k), (h, k), d, name=name)()
               for name in ('query', 'key', 'value')]
        out_kernel, out_bias = ProjectionParams((h, k, d), (d,), h * k, name='out')()
        scale = k ** -0.5  # folded into the query projection
        qkv[0] = qkv[0][0] * scale, qkv[0][1] * scale
        dropout = not deterministic and self.dropout_rate > 0
        fused = self.impl in (*FUSED_IMPLS, 'pallas') and not self.sow_probs and not dropout
        if fused and self.impl in FUSED_IMPLS:
            return self._fused(x, qkv, out_kernel, out_bias)
        w = jnp.concatenate([kk.reshape(d, h * k) for kk, _ in qkv], axis=1)
        bias = jnp.concatenate([bb.reshape(h * k) for _, bb in qkv])
        y = x.reshape(b * n, d).astype(self.dtype) @ w.astype(self.dtype) + bias.astype(self.dtype)
        if fused:  # Pallas flash attention; (B, N, H, Dh) in and out
            q, key, v = (y.reshape(b, n, 3, h, k)[:, :, i] for i in range(3))
            return self._out(pallas_attention(q, key, v, self.mesh), out_kernel, out_bias)
        q, key, v = y.reshape(b, n, 3, h, k).transpose(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, key)
        # Softmax in float32 whatever the compute dtype: the probabilities are
        # also what the attention penalty reads.
        if self.sow_probs and self.reduce_probs is not None:
            probs, reduced = softmax_and_reduce(logits, self.reduce_probs)
            self.sow('intermediates', 'attention_probs_reduced', reduced)
        else:
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            if self.sow_probs:
                self.sow('intermediates', 'attention_probs', probs)
        if dropout:
            probs = Dropout(self.dropout_rate, self.dropout_impl)(probs, deterministic=False)
        out = jnp.einsum('bhqk,bhkd->bqhd', probs.astype(self.dtype), v)
        return self._out(out, out_kernel, out_bias)

    def _fused(self, x: jax.Array, qkv: list[tuple[jax.Array, jax.Array]],
               out_kernel: jax.Array, out_bias: jax.Array) -> jax.Array:
        """Fused attention (cuDNN's, or XLA's on the same padding) on tokens padded to
        FUSED_ALIGN, laid out so that no activation is copied to feed the kernel or to take
        its gradients apart (on a GPU, 7% of the bytes a ViT-B/16 step at 384 px moves in
        XLA's own kernels; benchmarks/gpu_compile.py):

        * the block's normalised input is padded (inside the LayerNorm's kernel) and
          projected by three matmuls, each writing the (B, T, H, Dh) operand the kernel
          reads; an optimization barrier keeps XLA from merging them into one matmul whose
          output would be split into three copies;
        * the key bias is left out and the value bias moved into the output bias, exactly:
          q.b_k is the same for every key of a query's row, which softmax ignores (its
          gradient is zero), and probabilities sum to one, so P (V + b_v) W_o = P V W_o +
          b_v W_o. The key and value projections need no bias gradient reductions;
        * the padded rows of the kernel's output are sliced off before the output projection,
          and those of its gradients zeroed in place (`zero_padded_grad`): the kernel leaves
          them unspecified, and they must reach no weight or bias gradient.
        """
        b, n, d = x.shape
        h, k = self.num_heads, self.head_dim
        pad, (xp,) = _pad_tokens(FUSED_ALIGN, x)
        t = n + pad
        xp = xp.reshape(b * t, d).astype(self.dtype)
        (wq, bq), (wk, _), (wv, bv) = qkv
        q, key, v = (z @ w.reshape(d, h * k).astype(self.dtype)
                     for z, w in zip(jax.lax.optimization_barrier((xp, xp, xp)), (wq, wk, wv)))
        q = q + bq.reshape(h * k).astype(self.dtype)
        q, key, v = (zero_padded_grad(z.reshape(b, t, h, k), n) for z in (q, key, v))
        out = fused_attention(q, key, v, FUSED_IMPLS[self.impl], n)[:, :n]
        bias = out_bias + bv.reshape(h * k) @ out_kernel.reshape(h * k, d)
        return self._out(out, out_kernel, bias)

    def _out(self, out: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """(B, N, H, Dh) -> (B, N, D) through the `out` projection."""
        b, n, h, k = out.shape
        d = kernel.shape[-1]
        out = out.reshape(b * n, h * k) @ kernel.reshape(h * k, d).astype(self.dtype)
        return (out + bias.astype(self.dtype)).reshape(b, n, d)


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.1
    dropout_impl: str = 'flax'
    gelu_approximate: bool = True
    gelu_form: str = 'tanh'  # 'sigmoid': `gelu`'s sigmoid_form where a dropout follows

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        init = dict(kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
        y = nn.Dense(self.mlp_dim, **init)(x)
        dropout = not deterministic and self.dropout_rate > 0
        y = gelu(y, self.gelu_approximate, dropout and self.gelu_form == 'sigmoid')
        y = Dropout(self.dropout_rate, self.dropout_impl)(y, deterministic=deterministic)
        y = nn.Dense(x.shape[-1], **init)(y)
        return Dropout(self.dropout_rate, self.dropout_impl)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.1
    dropout_impl: str = 'flax'
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    gelu_form: str = 'tanh'
    sow_probs: bool = False
    reduce_probs: Callable[[jax.Array], jax.Array] | None = None
    attention_impl: str = 'xla'
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
        y = MultiHeadDotProductAttention(
            self.num_heads, self.head_dim, dtype=self.dtype,
            dropout_rate=self.attention_dropout_rate, dropout_impl=self.dropout_impl,
            sow_probs=self.sow_probs, reduce_probs=self.reduce_probs, impl=self.attention_impl,
            mesh=self.mesh, name='MultiHeadDotProductAttention_0')(y, deterministic=deterministic)
        x = x + Dropout(self.dropout_rate, self.dropout_impl)(y, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, dtype=self.dtype, dropout_rate=self.dropout_rate,
                     dropout_impl=self.dropout_impl, gelu_approximate=self.gelu_approximate,
                     gelu_form=self.gelu_form, name='MlpBlock_0')(
                         y, deterministic=deterministic)
        return x + y


class AddPositionEmbs(nn.Module):
    """Learned position embedding, stored as posembed_input/pos_embedding (1, N, D)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                         (1,) + x.shape[1:])
        return x + pos.astype(x.dtype)


class Encoder(nn.Module):
    num_layers: int
    num_heads: IntOrPerBlock
    head_dim: int
    mlp_dim: IntOrPerBlock
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.1
    dropout_impl: str = 'flax'
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    gelu_form: str = 'tanh'
    attention_impl: str = 'xla'
    remat: str = 'none'
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool,
                 capture_attention: Sequence[int] = (),
                 reduce_attention: Callable[[jax.Array], jax.Array] | None = None
                 ) -> jax.Array:
        x = AddPositionEmbs(name='posembed_input')(x)
        x = Dropout(self.dropout_rate, self.dropout_impl)(x, deterministic=deterministic)
        heads = per_block(self.num_heads, self.num_layers, 'num_heads')
        mlps = per_block(self.mlp_dim, self.num_layers, 'mlp_dim')
        # Rematerialisation: the backward pass recomputes each block's activations (all, or
        # all but the matmul outputs) instead of keeping them, so larger batches fit.
        block = Encoder1DBlock if self.remat == 'none' else nn.remat(
            Encoder1DBlock, policy=REMAT[self.remat], static_argnums=(2,))
        for i in range(self.num_layers):
            x = block(
                heads[i], self.head_dim, mlps[i], dtype=self.dtype,
                dropout_rate=self.dropout_rate, dropout_impl=self.dropout_impl,
                attention_dropout_rate=self.attention_dropout_rate,
                layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
                gelu_form=self.gelu_form, sow_probs=i in capture_attention,
                reduce_probs=reduce_attention if i in capture_attention else None,
                attention_impl=self.attention_impl, mesh=self.mesh,
                name=f'encoderblock_{i}')(x, deterministic)
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                            name='encoder_norm')(x)


class VisionTransformer(nn.Module):
    """ViT with a class token; `head` is zero-initialised as in the official code."""

    num_classes: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: IntOrPerBlock
    mlp_dim: IntOrPerBlock
    head_dim: int | None = None
    representation_size: int | None = None
    dropout_rate: float = 0.1
    dropout_impl: str = 'flax'     # how dropout draws its mask: flax | bytes | hash (dropout.py)
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    gelu_form: str = 'tanh'        # 'sigmoid': out of a GPU matmul's epilogue, see `gelu`
    dtype: Dtype = jnp.float32
    attention_impl: str = 'xla'    # 'xla' | 'cudnn' (fused, NVIDIA GPUs) | 'pallas' (TPUs)
    #                                | 'padded_xla' (cudnn's padding and masking, XLA's kernel)
    remat: str = 'none'            # 'none' | 'full' | 'dots' (keep matmul/fused attention outputs)
    mesh: Mesh | None = None       # 'pallas' runs per device over it (the batch is sharded)

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        heads = per_block(self.num_heads, self.num_layers, 'num_heads')
        if self.hidden_size % heads[0]:
            raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                             f'num_heads {heads[0]}')
        return self.hidden_size // heads[0]

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False,
                 capture_attention: Sequence[int] = (),
                 reduce_attention: Callable[[jax.Array], jax.Array] | None = None
                 ) -> jax.Array:
        """images: (B, H, W, C) float; returns logits (B, num_classes) in float32.

        capture_attention: block indices whose post-softmax attention
        probabilities (B, heads, N, N) are sown into `intermediates` as
        'attention_probs'; apply with ``mutable=['intermediates']`` to read them.
        reduce_attention: sow this function of them instead, as
        'attention_probs_reduced' (`softmax_and_reduce`: the backward pass
        recomputes the probabilities rather than keeping them).
        """
        p = self.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch {p}')
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                    dtype=self.dtype, name='embedding')(images.astype(self.dtype))
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
        x = Encoder(self.num_layers, self.num_heads, self.resolved_head_dim, self.mlp_dim,
                    dtype=self.dtype, dropout_rate=self.dropout_rate,
                    dropout_impl=self.dropout_impl,
                    attention_dropout_rate=self.attention_dropout_rate,
                    layer_norm_eps=self.layer_norm_eps,
                    gelu_approximate=self.gelu_approximate, gelu_form=self.gelu_form,
                    attention_impl=self.attention_impl, remat=self.remat, mesh=self.mesh,
                    name='Transformer')(
                        x, deterministic=not train, capture_attention=capture_attention,
                        reduce_attention=reduce_attention)
        x = x[:, 0]
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                                 name='pre_logits')(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name='head',
                     kernel_init=nn.initializers.zeros)(x)
        return x.astype(jnp.float32)
