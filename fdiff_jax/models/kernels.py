"""The U-Net's GroupNorm and attention, in a variant per backend.

'cpu' arranges the work for XLA:CPU, where passes over memory cost more than
the arithmetic: GroupNorm sums per channel first, then per group, and
attention runs over cache-sized pieces of the batch. 'xla' is the plain form
for accelerators: flax's `nn.GroupNorm` and attention over the whole batch at
once. Both variants have the same parameters (GroupNorm's module class is
named `GroupNorm` in both, so parameter names match) and the same math, so a
checkpoint trained with one runs with the other (`tests/test_unet.py`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdiff_jax.errors import lookup

# `config.model.kernels` -> what it selects; 'auto' is resolved once, at model construction.
CHOICES = {
  'auto': "'cpu' on the CPU backend, else 'xla'",
  'cpu': 'per-channel-first GroupNorm sums, attention in cache-sized pieces',
  'xla': "flax's GroupNorm, attention over the whole batch at once",
}

# 'cpu' attention runs over pieces of the batch whose [L, L] maps fit in cache.
CPU_ATTENTION_PIECE_BYTES = 16 * 2**20


def resolve(choice: str) -> str:
  """The variant ('cpu' or 'xla') for a `config.model.kernels` choice."""
  lookup(CHOICES, choice, 'config.model.kernels')
  if choice == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return choice


class GroupNorm(nn.Module):
  """`nn.GroupNorm`'s math and parameters, with its sums taken per channel first.

  Statistics in float32, Var = E[x^2] - E[x]^2 clipped at 0, epsilon 1e-6 and
  parameters `scale` and `bias`, as flax's. The sums run over the pixels per
  channel, then over each group's channels: XLA:CPU is several times slower at
  flax's one-step sum over pixels and a group's channels once groups have two
  or more channels.
  """

  num_groups: int
  dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    pixels = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)

    def group_mean(channel_mean):  # [B, C] -> each group's mean, repeated to [B, 1.., C]
      g = channel_mean.reshape(-1, self.num_groups, c // self.num_groups).mean(-1)
      return jnp.repeat(g, c // self.num_groups, axis=-1).reshape(
        (x.shape[0],) + (1,) * len(pixels) + (c,)
      )

    mean = group_mean(x32.mean(pixels))
    var = jnp.maximum(group_mean(jnp.square(x32).mean(pixels)) - jnp.square(mean), 0.0)
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def group_norm(variant: str, num_groups: int, dtype: Any) -> nn.Module:
  """A GroupNorm of `variant`: this module's `GroupNorm` for 'cpu', `nn.GroupNorm` for 'xla'."""
  norm = {'cpu': GroupNorm, 'xla': nn.GroupNorm}[variant]
  return norm(num_groups=num_groups, dtype=dtype, epsilon=1e-6)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, variant: str) -> jax.Array:
  """Softmax attention over [B, L, heads, d], as two 3-D matmuls over [B * heads, L, d].

  The same math as `jax.nn.dot_product_attention`: heads are folded into the
  batch, and the softmax is normalised after the second matmul, on [L, d]
  instead of [L, L]. With 'cpu' the folded batch runs in pieces of about
  `CPU_ATTENTION_PIECE_BYTES` of maps, one after another (chained by
  optimization barriers, or XLA interleaves them), so each piece's maps stay
  in cache; 'xla' runs it whole.
  """
  b, length, heads, d = q.shape
  fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * heads, length, d)
  q, k, v = fold(q) * d**-0.5, fold(k), fold(v)
  piece = {'cpu': max(1, CPU_ATTENTION_PIECE_BYTES // (4 * length * length)), 'xla': b * heads}[
    variant
  ]
  outputs = []
  for start in range(0, b * heads, piece):
    part = [x[start : start + piece] for x in (q, k, v)]
    if outputs:  # This piece starts when the previous one is done.
      outputs[-1], *part = jax.lax.optimization_barrier((outputs[-1], *part))
    outputs.append(_attention(*part))
  y = jnp.concatenate(outputs) if len(outputs) > 1 else outputs[0]
  return y.reshape(b, heads, length, d).transpose(0, 2, 1, 3)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v over [n, L, d], normalised after the second matmul.

  The row maximum subtracted before exp cancels exactly, so its gradient is stopped.
  The softmax (logits, exp, row sums, the division) is float32 whatever the
  compute dtype; only the second matmul's inputs take it.
  """
  logits = jnp.einsum('nqd,nkd->nqk', q, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  y = jnp.einsum('nqk,nkd->nqd', weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (y / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)
