"""Applies a jitted image function to many images in fixed-size batches (one compile)."""
import jax
import numpy as np


def apply_in_batches(fn, images, batch_size):
  """fn([B, ...]) -> pytree of [B, ...] arrays, over all `images`, as numpy.

  The last chunk is zero-padded to `batch_size`, so `fn` compiles once.
  """
  images = np.asarray(images, np.float32)
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1))
    outputs.append(jax.tree.map(lambda y: np.asarray(y)[:len(images) - start], fn(chunk)))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
