"""GELU with a backward pass that keeps only its input (`gelu`)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


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
