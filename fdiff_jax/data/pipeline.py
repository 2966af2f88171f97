"""The input pipeline: numpy batches of [-1, 1] images and attributes.

Batches are gathered from the prepared uint8 arrays (`prepared.py`: every
example decoded and resized once) by global position, so the order is a
pure function of (seed, global position): training can start at any step
without reading the batches before it, and each process reads only its own
slots of every global batch. Worker threads make the next batches while
the current one trains (numpy releases the GIL while it copies).
"""

import collections
import threading
from collections.abc import Iterator
from concurrent import futures

import jax
import numpy as np

from fdiff_jax.data import sources
from fdiff_jax.data.prepared import (  # noqa: F401  (part of this module's interface)
  Arrays,
  attribute_names,
  image_shape,
  open_arrays,
  preprocess_image,
  to_float,
)
from fdiff_jax.errors import UserError

THREADS = 2  # Worker threads of a training iterator; `fdiff bench --what data` measures more.
PREFETCH = 4  # Batches made ahead of the one being consumed.


def num_examples(config, split: str) -> int:
  """Number of examples in `split` of the configured dataset."""
  return len(sources.open_split(config, split))


def _per_process_batch(global_batch: int) -> int:
  """This process's share of a global batch; it must divide evenly."""
  processes = jax.process_count()
  if global_batch % processes:
    raise UserError(
      f'batch size {global_batch} is not divisible by the'
      f' {processes} processes; use a multiple of {processes}.'
    )
  return global_batch // processes


class _Order:
  """Which example, flipped or not, each global position g reads.

  Position g reads example permutation_e[g % N] of epoch e = g // N, with
  permutation_e = `default_rng((seed, 0, e)).permutation(N)`; with flip, it
  is mirrored where `default_rng((seed, 1, e)).random(N)[g % N] < 0.5`.
  Both depend on nothing but the seed and g. Without shuffle, g reads g.
  """

  def __init__(self, seed: int, size: int, shuffle: bool, flip: bool):
    self._seed = seed % 2**64  # SeedSequence takes non-negative integers only.
    self._size, self._shuffle, self._flip = size, shuffle, flip
    self._epochs = collections.OrderedDict()  # The last few epochs' (permutation, flips).
    self._lock = threading.Lock()  # Worker threads share the epochs.

  def _epoch(self, epoch: int):
    with self._lock:
      if epoch not in self._epochs:
        permutation = flips = None
        if self._shuffle:
          permutation = np.random.default_rng((self._seed, 0, epoch)).permutation(self._size)
        if self._flip:
          flips = np.random.default_rng((self._seed, 1, epoch)).random(self._size) < 0.5
        self._epochs[epoch] = permutation, flips
        while len(self._epochs) > 4:
          self._epochs.popitem(last=False)
      return self._epochs[epoch]

  def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, flip flags) of `positions`."""
    epochs, slots = np.divmod(positions, self._size)
    indices, flips = slots.copy(), np.zeros(len(positions), bool)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      permutation, epoch_flips = self._epoch(int(epoch))
      if permutation is not None:
        indices[here] = permutation[slots[here]]
      if epoch_flips is not None:
        flips[here] = epoch_flips[slots[here]]
    return indices, flips


def _gather(arrays: Arrays, indices: np.ndarray, flips: np.ndarray) -> dict:
  """The batch of `indices`, mirrored where `flips`, as float32 [-1, 1]."""
  images = arrays.images[indices]
  if flips.any():
    images[flips] = images[flips, :, ::-1]
  return {'image': to_float(images), 'attributes': arrays.attributes[indices]}


class _Prefetch:
  """`make(step)` for step in `steps`, computed ahead by worker threads, yielded in order.

  The workers only copy and convert arrays; `close()` (or the interpreter's
  exit, which joins them) waits at most for the batches in flight.
  """

  def __init__(self, make, steps, threads: int, depth: int = PREFETCH):
    if threads < 1:
      raise UserError(f'the input pipeline needs at least 1 thread, got {threads}')
    self._make, self._steps = make, iter(steps)
    self._executor = futures.ThreadPoolExecutor(threads, thread_name_prefix='fdiff-data')
    self._pending = collections.deque()
    for _ in range(max(depth, threads)):
      self._submit()

  def _submit(self):
    step = next(self._steps, None)
    if step is not None:
      self._pending.append(self._executor.submit(self._make, step))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self._pending:
      self.close()
      raise StopIteration
    try:
      batch = self._pending.popleft().result()
    except BaseException:
      self.close()
      raise
    self._submit()
    return batch

  def close(self):
    """Stops making batches; nothing is left running after those in flight."""
    self._pending.clear()
    self._executor.shutdown(wait=False, cancel_futures=True)


def create_train_iterator(
  config, start_step: int = 0, arrays: Arrays | None = None, threads: int = THREADS
) -> Iterator[dict]:
  """Endless shuffled batches of this process's part of each global batch.

  Yields {'image': float32 [B, H, W, C] in [-1, 1], 'attributes': float32
  [B, A]} with B = config.train.batch_size // jax.process_count(). The images
  are the prepared uint8 values mapped back to [-1, 1]: within 1/255 of what
  `preprocess_image` gives, since they were rounded to uint8 when prepared.

  Global batch s holds global positions s*G .. s*G+G-1 (G the global batch).
  Process p reads only positions s*G + p*B .. s*G + p*B + B-1, so the
  processes' batches, concatenated in process order, equal the batch a
  single process gets with the whole global batch. Starting at step k starts
  at position k*G: exactly the batches k, k+1, ... of a run from step 0,
  with nothing read for the steps skipped. `arrays` are the prepared
  config.data.train_split (`open_arrays`), where the caller already has them.
  """
  if arrays is None:
    arrays = open_arrays(config, config.data.train_split)
  global_batch = config.train.batch_size
  batch = _per_process_batch(global_batch)
  slots = jax.process_index() * batch + np.arange(batch, dtype=np.int64)
  order = _Order(config.seed, len(arrays), shuffle=True, flip=config.data.random_flip)

  def make(step):
    return _gather(arrays, *order(step * global_batch + slots))

  return _Prefetch(make, _counter(start_step), threads)


def _counter(start: int) -> Iterator[int]:
  step = start
  while True:
    yield step
    step += 1


def create_eval_iterator(
  config, split: str | None = None, batch_size: int | None = None
) -> Iterator[dict]:
  """One pass over `split` (default config.data.eval_split) in stored order.

  No shuffle, no flip. `batch_size` is global (default
  config.train.batch_size) and split over processes like training batches:
  process p gets slots p*B .. p*B+B-1 of each global batch. Every process
  yields the same number of batches, ceil(N / batch_size); the last one may
  be partial, on some processes even empty (0 rows): pad it before
  assembling a global array.
  """
  arrays = open_arrays(config, split or config.data.eval_split)
  global_batch = batch_size or config.train.batch_size
  batch = _per_process_batch(global_batch)
  slots = jax.process_index() * batch + np.arange(batch, dtype=np.int64)
  no_flips = np.zeros(batch, bool)

  def make(step):
    positions = step * global_batch + slots
    here = positions < len(arrays)
    return _gather(arrays, positions[here], no_flips[here])

  return _Prefetch(make, range(-(-len(arrays) // global_batch)), THREADS)
