"""Model construction from a config."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fdiff_jax.models import kernels
from fdiff_jax.models.unet import PRESETS, UNet, count_params


def build_model(model_config, num_attributes: int) -> UNet:
  """The U-Net for `config.model`; `num_attributes` comes from the dataset.

  `model.kernels` is resolved here, once (a saved config without it means 'auto').
  """
  m = model_config
  return UNet(
    ch=m.ch,
    ch_mult=tuple(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    num_heads=m.num_heads,
    dropout=m.dropout,
    num_attributes=num_attributes if m.conditional else 0,
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.param_dtype),
    kernels=kernels.resolve(m.get('kernels', 'auto')),
  )


def initial_params(model: UNet, rng: jax.Array, image_shape: Sequence[int], batch: int = 1) -> Any:
  """Initial parameters of `model` for images of `image_shape` (H, W, C); traceable."""
  x = jnp.zeros((batch,) + tuple(image_shape), jnp.float32)
  a = jnp.zeros((batch, model.num_attributes), jnp.float32) if model.num_attributes else None
  return model.init(rng, x, jnp.zeros((batch,), jnp.int32), a)['params']


def init_once(init_fn: Callable[[], Any], out_sharding: jax.sharding.Sharding | None = None) -> Any:
  """`init_fn()` computed once, placed with `out_sharding`.

  Compiled without backend optimisation: it runs once, and XLA otherwise
  spends several seconds optimising the initialisers' random number code.
  """
  compiled = (
    jax.jit(init_fn, out_shardings=out_sharding)
    .lower()
    .compile(compiler_options={'xla_backend_optimization_level': 0})
  )
  return compiled()


def init_params(
  model: UNet,
  rng: jax.Array,
  image_shape: Sequence[int],
  batch: int = 1,
  out_sharding: jax.sharding.Sharding | None = None,
) -> Any:
  """`initial_params` computed once (see `init_once`)."""
  return init_once(lambda: initial_params(model, rng, image_shape, batch), out_sharding)


__all__ = [
  'PRESETS',
  'UNet',
  'build_model',
  'count_params',
  'init_once',
  'init_params',
  'initial_params',
]
