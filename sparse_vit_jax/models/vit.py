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

The kernels its blocks call are beside it: `attention` (the exact softmax with a penalty, fused
and Pallas attention on padded tokens), `gelu`, `dropout`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sparse_vit_jax.models.attention import (
    FUSED_ALIGN,
    FUSED_IMPLS,
    fused_attention,
    pad_tokens,
    pallas_attention,
    softmax_and_reduce,
    zero_padded_grad,
)
from sparse_vit_jax.models.dropout import Dropout
from sparse_vit_jax.models.gelu import gelu

Dtype = Any
IntOrPerBlock = int | Sequence[int]


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
        pad, (xp,) = pad_tokens(FUSED_ALIGN, x)
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
