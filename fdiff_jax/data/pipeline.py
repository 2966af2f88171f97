"""The tf.data input pipeline: numpy batches of [-1, 1] images and attributes.

Examples are read by index from TFDS array_record files, so the order is a
pure function of (seed, global position): training can start at any step
without reading the batches before it, and each process reads only its own
slots of every global batch.
"""

import atexit
import weakref
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from fdiff_jax.data import sources
from fdiff_jax.errors import UserError


def attribute_names(config) -> tuple[str, ...]:
  """The attribute names of the configured dataset (40 CelebA or 10 digits)."""
  return sources.dataset_spec(config).attribute_names


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the images the pipeline yields."""
  size = config.data.image_size
  return size, size, sources.dataset_spec(config).channels


def preprocess_image(image, config):
  """uint8 HxWxC image -> float32 [-1, 1] of `image_shape(config)`.

  CelebA is center-cropped to a square, then resized with antialiasing (no
  squashing); digits are just resized. Takes a tf.Tensor (in the pipeline) or
  a numpy array (e.g. a user photo to edit) and returns the same kind.
  """
  if isinstance(image, np.ndarray):
    channels = image_shape(config)[-1]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != channels:
      raise UserError(
        f'expected a uint8 HxWx{channels} image, got'
        f' {image.dtype} {image.shape}; convert it first (e.g.'
        f" PIL's .convert('{'RGB' if channels == 3 else 'L'}'))."
      )
    return preprocess_image(tf.constant(image), config).numpy()
  if sources.dataset_spec(config).crop_to_square:
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    image = tf.image.crop_to_bounding_box(
      image, (height - side) // 2, (width - side) // 2, side, side
    )
  size = config.data.image_size
  image = tf.image.resize(image, (size, size), antialias=True)
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def num_examples(config, split: str) -> int:
  """Number of examples in `split` of the configured dataset."""
  return len(sources.open_split(config, split))


class _Batches:
  """Numpy batches of a tf.data pipeline, closed before the interpreter exits.

  tf.data threads still running the Python fetch when Python shuts down
  deadlock the exit; `_close_all` at exit releases the pipelines first.
  Releasing one waits for its in-flight elements and holds up the main
  thread, seconds on a busy host, so `close()` only retires it: it is released
  when the next pipeline starts or at exit, and a training command that ends
  with `os._exit` after its last checkpoint never waits for it.
  """

  _live = weakref.WeakSet()
  _retired = []  # At most one closed, not yet released tf.data iterator.

  def __init__(self, dataset: tf.data.Dataset):
    _Batches._retired.clear()
    self._iterator = dataset.as_numpy_iterator()
    self._live.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      raise StopIteration
    try:
      return next(self._iterator)
    except tf.errors.InvalidArgumentError as e:  # A stored image the decoder cannot read.
      self.close()
      message = ' '.join(e.message.split())
      raise UserError(
        f'an image of the dataset cannot be decoded ({message[:200]}); prepare the '
        'dataset again from intact files (delete its folder in config.data.data_dir)'
      ) from None

  def close(self):
    """Stops reading; the tf.data iterator is retired (see the class docstring)."""
    if self._iterator is not None:
      _Batches._retired[:] = [self._iterator]
    self._iterator = None


@atexit.register
def _close_all():
  _Batches._retired.clear()  # pylint: disable=protected-access
  for batches in list(_Batches._live):  # pylint: disable=protected-access
    batches._iterator = None  # pylint: disable=protected-access


def _per_process_batch(global_batch: int) -> int:
  """This process's share of a global batch; it must divide evenly."""
  processes = jax.process_count()
  if global_batch % processes:
    raise UserError(
      f'batch size {global_batch} is not divisible by the'
      f' {processes} processes; use a multiple of {processes}.'
    )
  return global_batch // processes


def _loader(config, split: sources.Split, shuffle: bool, flip: bool):
  """Returns a tf function: global position -> {'image', 'attributes'}.

  With shuffle, position g reads example permutation_e[g % N] of epoch
  e = g // N, a stateless `index_shuffle` keyed by (seed, e); with flip, the
  flip is keyed by (seed, g). Both depend on nothing but g and the seed.
  """
  size, channels = len(split), image_shape(config)[-1]
  shuffle_key, flip_key = tf.unstack(
    tf.random.experimental.stateless_split(tf.constant([config.seed, 0], tf.int64), 2)
  )

  def load(position):
    index = position % size
    if shuffle:
      seed = tf.random.experimental.stateless_fold_in(shuffle_key, position // size)
      index = tf.random.experimental.index_shuffle(index, seed, size - 1)
    encoded, attributes = tf.numpy_function(
      split.__getitem__, [index], (tf.string, tf.float32), stateful=False
    )
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image = preprocess_image(image, config)
    if flip:
      seed = tf.random.experimental.stateless_fold_in(flip_key, position)
      image = tf.cond(
        tf.random.stateless_uniform([], seed) < 0.5,
        lambda: tf.image.flip_left_right(image),
        lambda: image,
      )
    attributes.set_shape([len(attribute_names(config))])
    return {'image': image, 'attributes': attributes}

  return load


def create_train_iterator(
  config, start_step: int = 0, split: sources.Split | None = None
) -> Iterator[dict]:
  """Endless shuffled batches of this process's part of each global batch.

  Yields {'image': float32 [B, H, W, C] in [-1, 1], 'attributes': float32
  [B, A]} with B = config.train.batch_size // jax.process_count().

  Global batch s holds global positions s*G .. s*G+G-1 (G the global batch).
  Process p reads only positions s*G + p*B .. s*G + p*B + B-1, so the
  processes' batches, concatenated in process order, equal the batch a
  single process gets with the whole global batch. Starting at step k starts
  the position counter at k*G: exactly the batches k, k+1, ... of a run from
  step 0, with nothing read or decoded for the steps skipped. `split` is the
  opened config.data.train_split, where the caller already has it.
  """
  if split is None:
    split = sources.open_split(config, config.data.train_split)
  batch = _per_process_batch(config.train.batch_size)
  offset = jax.process_index() * batch
  load = _loader(config, split, shuffle=True, flip=config.data.random_flip)

  def global_position(counter):
    step, slot = counter // batch, counter % batch
    return step * config.train.batch_size + offset + slot

  ds = tf.data.Dataset.range(start_step * batch, np.iinfo(np.int64).max)
  ds = ds.map(lambda counter: load(global_position(counter)), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _Batches(ds)


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
  data = sources.open_split(config, split or config.data.eval_split)
  global_batch = batch_size or config.train.batch_size
  batch = _per_process_batch(global_batch)
  steps = -(-len(data) // global_batch)
  positions = (
    np.arange(steps)[:, None] * global_batch + jax.process_index() * batch + np.arange(batch)
  ).ravel()
  positions = positions[positions < len(data)]
  load = _loader(config, data, shuffle=False, flip=False)
  ds = tf.data.Dataset.from_tensor_slices(positions)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
  return _pad_with_empty_batches(_Batches(ds), steps, config)


def _pad_with_empty_batches(batches, steps: int, config) -> Iterator[dict]:
  """Yields `batches`, then empty ones until `steps` batches were yielded."""
  count = 0
  for count, batch in enumerate(batches, 1):
    yield batch
  for _ in range(steps - count):
    yield {
      'image': np.zeros((0, *image_shape(config)), np.float32),
      'attributes': np.zeros((0, len(attribute_names(config))), np.float32),
    }
