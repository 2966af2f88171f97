"""Runs a jitted function over many examples in fixed-size batches, so it compiles once."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Progress = Callable[[int, int], None]


def map_batches(
  fn: Callable[..., Any],
  arrays: Sequence[np.ndarray],
  batch_size: int,
  progress: Progress | None = None,
) -> Any:
  """fn(batch index, *batches) over the leading axis of `arrays`, concatenated as numpy.

  Every batch has `batch_size` rows: the last one is padded by repeating its last row,
  and the padding is cut from the outputs. `fn` returns an array or a pytree of arrays
  with the batch as leading axis. `progress(done, total)` is called after each batch.
  """
  n = len(arrays[0])
  if n < 1 or batch_size < 1:
    raise ValueError(
      f'need at least one example and a batch size of at least 1, got {n} '
      f'examples and batch size {batch_size}'
    )
  count = -(-n // batch_size)
  outputs = []
  for b in range(count):
    chunks = [_pad(a[b * batch_size : (b + 1) * batch_size], batch_size) for a in arrays]
    rows = min(batch_size, n - b * batch_size)
    outputs.append(jax.tree.map(lambda y, rows=rows: np.asarray(y)[:rows], fn(b, *chunks)))
    if progress:
      progress(b + 1, count)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
  """`array` with its last row repeated up to `size` rows."""
  array = np.asarray(array)
  return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])
