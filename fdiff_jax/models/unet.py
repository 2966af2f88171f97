"""Attribute-conditioned U-Net (Flax linen), NHWC throughout.

ResNet blocks with GroupNorm/SiLU/dropout, self-attention at chosen
resolutions and in the middle, strided-conv downsampling, nearest+conv
upsampling, skip connections and a zero-initialised output conv. A sinusoidal
timestep embedding (through an MLP) plus an attribute embedding conditions
every ResNet block by scale-and-shift (FiLM).
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdiff_jax.models import kernels

# Architecture presets; configs apply them with `config.model.update(...)`.
PRESETS = {
  # The original face-diffusion project's U-Net (64x64, ~1.38M parameters).
  'original': dict(
    ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=2, attn_resolutions=(32, 16, 8), num_heads=1
  ),
  # Our recommended CelebA-64 model (~40M parameters; DDPM's CIFAR-10 net
  # (Ho et al. 2020) with one more level for 64x64 and attention at 16 and 8).
  'celeba64': dict(
    ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8), num_heads=4
  ),
}


def timestep_embedding(t, dim, max_period=10_000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class AttributeEmbedding(nn.Module):
  """Learned "present" and "absent" vectors per attribute.

  A value v in [-1, 1] contributes max(v, 0) * present + max(-v, 0) * absent,
  so 0 (unspecified) contributes nothing and values in between interpolate
  linearly; the all-zero vector is exactly the unconditional input.
  """

  num_attributes: int
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, attributes):
    init = nn.initializers.normal(stddev=0.02)
    present = self.param('present', init, (self.num_attributes, self.features), self.param_dtype)
    absent = self.param('absent', init, (self.num_attributes, self.features), self.param_dtype)
    a = attributes.astype(jnp.float32)
    return jax.nn.relu(a) @ present + jax.nn.relu(-a) @ absent


def group_norm(channels: int, dtype: Any, variant: str) -> nn.Module:
  """GroupNorm with 32 groups, or the largest power of two dividing `channels`."""
  return kernels.group_norm(variant, math.gcd(32, channels), dtype)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv, FiLM by the conditioning vector, dropout, Conv."""

  out_ch: int
  dropout: float
  dtype: Any
  param_dtype: Any
  kernels: str

  @nn.compact
  def __call__(self, x, cond, train):
    conv = lambda ch, k, **kw: nn.Conv(
      ch, (k, k), dtype=self.dtype, param_dtype=self.param_dtype, **kw
    )
    h = nn.silu(group_norm(x.shape[-1], self.dtype, self.kernels)(x))
    h = conv(self.out_ch, 3)(h)
    scale_shift = nn.Dense(2 * self.out_ch, dtype=self.dtype, param_dtype=self.param_dtype)(
      nn.silu(cond)
    )
    scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
    h = group_norm(self.out_ch, self.dtype, self.kernels)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_ch, 3, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels, with a residual connection."""

  num_heads: int
  dtype: Any
  param_dtype: Any
  kernels: str

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    y = group_norm(c, self.dtype, self.kernels)(x).reshape(b, h * w, c)
    qkv = nn.DenseGeneral(
      (3, self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype
    )(y)
    y = kernels.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.kernels)
    y = nn.DenseGeneral(
      c,
      axis=(-2, -1),
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """Noise (or v) predictor: (x_t [B,H,W,C], t [B], attributes [B,A] | None) -> [B,H,W,C].

  `num_attributes=0` builds an unconditional model with no attribute input.
  For a conditional model, `attributes=None` is the same as all zeros.
  `kernels` picks the GroupNorm and attention variant ('cpu' or 'xla',
  `models/kernels.py`); both have the same parameters and outputs.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16, 8)
  num_heads: int = 4
  dropout: float = 0.1
  num_attributes: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernels: str = 'xla'

  @nn.compact
  def __call__(self, x, t, attributes=None, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blocks = dict(kw, kernels=self.kernels)
    emb_dim = 4 * self.ch
    cond = timestep_embedding(t, self.ch)
    cond = nn.Dense(emb_dim, **kw)(cond)
    cond = nn.Dense(emb_dim, **kw)(nn.silu(cond))
    if self.num_attributes:
      if attributes is not None:
        cond = cond + AttributeEmbedding(self.num_attributes, emb_dim, self.param_dtype)(attributes)
      else:  # Same parameters as a conditional call, zero contribution.
        AttributeEmbedding(self.num_attributes, emb_dim, self.param_dtype)(
          jnp.zeros((x.shape[0], self.num_attributes))
        )
    elif attributes is not None and attributes.shape[-1]:
      raise ValueError('this UNet is unconditional (num_attributes=0) but got attributes')

    res_block = lambda ch: ResBlock(ch, self.dropout, **blocks)
    attn_block = lambda: AttentionBlock(self.num_heads, **blocks)

    h = nn.Conv(self.ch, (3, 3), **kw)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.ch * mult)(h, cond, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), **kw)(h)
        skips.append(h)

    h = res_block(h.shape[-1])(h, cond, train)
    h = attn_block()(h)
    h = res_block(h.shape[-1])(h, cond, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(self.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), cond, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
      if level != 0:
        b, height, width, c = h.shape
        h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        h = nn.Conv(c, (3, 3), **kw)(h.reshape(b, 2 * height, 2 * width, c))

    h = nn.silu(group_norm(h.shape[-1], self.dtype, self.kernels)(h))
    out = nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, **kw)(h)
    return out.astype(jnp.float32)


def count_params(params):
  return sum(p.size for p in jax.tree.leaves(params))
