"""Prepared arrays: every example of a split decoded and resized once, kept as uint8.

Decoding a 178x218 JPEG and resizing it costs far more than training reads,
so for each (dataset, split, image size) the images are run through
`preprocess_image` once, rounded to uint8 and stored as `images.npy`
[N, H, W, C] next to `attributes.npy` (float32 [N, A]) in

  {TFDS data dir}/fdiff_prepared/{builder}/{version}/{split}-{size}px-{key}/

read back memory-mapped. `key` hashes the names, sizes and modification
times of the TFDS files the split comes from, so when TFDS prepares the
dataset again (e.g. the CelebA manual files changed) the arrays are prepared
again too. A preparation writes into a temporary folder under a file lock and
renames it into place when complete: a killed one leaves nothing that loads,
and its leftover is removed by the next.
"""

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
from concurrent import futures

import numpy as np
import tensorflow as tf
from absl import logging

from fdiff_jax.data import sources
from fdiff_jax.errors import UserError

FORMAT = 1  # Changes whenever what is stored (or how it is computed) changes.
CHUNK = 1024  # Examples decoded per tf.data pass while preparing.


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


def to_uint8(image):
  """[-1, 1] -> uint8 0..255, rounded to nearest (what the prepared arrays store)."""
  return tf.cast(tf.round((image + 1.0) * 127.5), tf.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 [-1, 1], the inverse of `to_uint8` up to its rounding (1/255)."""
  out = images.astype(np.float32)
  out *= 1 / 127.5
  out -= 1.0
  return out


@dataclasses.dataclass(frozen=True)
class Arrays:
  """One prepared split: uint8 images [N, H, W, C] and float32 attributes [N, A]."""

  images: np.ndarray
  attributes: np.ndarray

  def __len__(self) -> int:
    return len(self.images)


def open_arrays(config, split: str) -> Arrays:
  """The prepared arrays of `split` at config.data.image_size, prepared first if needed.

  Prepares the TFDS dataset first when it is not (see `sources.open_split`).
  Where the TFDS files are not on disk (`tfds.testing.mock_data`) the arrays
  are made in memory and not stored.
  """
  source = sources.open_split(config, split)
  files = _source_files(source.data_dir)
  if not files:
    return _prepare(source, config, None)
  size = config.data.image_size
  name = f'{re.sub(r"[^A-Za-z0-9_.-]", "_", split)}-{size}px'
  version_dir = os.path.normpath(source.data_dir)
  root = os.path.join(
    os.path.dirname(os.path.dirname(version_dir)),
    'fdiff_prepared',
    os.path.basename(os.path.dirname(version_dir)),
    os.path.basename(version_dir),
  )
  path = os.path.join(root, f'{name}-{_key(config, split, files)}')
  if not os.path.isdir(path):
    try:
      os.makedirs(root, exist_ok=True)
      lock = _locked(os.path.join(root, f'{name}.lock'))
    except OSError as e:
      raise UserError(
        f'cannot write the prepared {split} arrays under {root} ({e.strerror}); make it'
        ' writable or set config.data.data_dir to a writable folder'
      ) from None
    with lock:
      if not os.path.isdir(path):  # Not prepared by another run while we waited.
        for stale in glob.glob(os.path.join(root, f'.tmp-{name}-*')):
          shutil.rmtree(stale)  # Left by a killed preparation: nobody else holds the lock.
        temporary = os.path.join(root, f'.tmp-{name}-{os.getpid()}')
        os.makedirs(temporary)
        try:
          _prepare(source, config, temporary)
          os.rename(temporary, path)
        except BaseException:
          shutil.rmtree(temporary, ignore_errors=True)
          raise
        for old in glob.glob(os.path.join(root, f'{name}-*')):
          if old != path:
            shutil.rmtree(old, ignore_errors=True)  # Made from TFDS files since replaced.
  return Arrays(
    np.load(os.path.join(path, 'images.npy'), mmap_mode='r'),
    np.load(os.path.join(path, 'attributes.npy')),
  )


def _source_files(data_dir: str) -> list[str]:
  if not data_dir or not os.path.isdir(data_dir):
    return []
  return sorted(f for f in glob.glob(os.path.join(data_dir, '*')) if os.path.isfile(f))


def _key(config, split: str, files: list[str]) -> str:
  """A hash of what the arrays are made from and how; it changes with any TFDS file."""
  spec = sources.dataset_spec(config)
  stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  payload = [FORMAT, config.data.dataset, split, image_shape(config), spec.crop_to_square, stats]
  return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _holding(f):
  fcntl.flock(f, fcntl.LOCK_EX)
  try:
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _locked(path: str):
  """An exclusive lock on `path` (the OS releases it if the process dies); opens it now."""
  return _holding(open(path, 'a'))  # pylint: disable=consider-using-with


def _prepare(source: sources.Split, config, folder: str | None) -> Arrays:
  """Decodes and preprocesses every example of `source`; writes the arrays into `folder`."""
  count, shape = len(source), image_shape(config)
  num_attributes = len(attribute_names(config))
  if folder is None:
    images = np.empty((count, *shape), np.uint8)
  else:
    images = np.lib.format.open_memmap(
      os.path.join(folder, 'images.npy'), 'w+', np.uint8, (count, *shape)
    )
  attributes = np.empty((count, num_attributes), np.float32)

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=shape[-1], expand_animations=False)
    return to_uint8(preprocess_image(image, config))

  def read(start):  # Encoded images of one chunk; their attributes go straight in place.
    encoded = []
    for i in range(start, min(count, start + CHUNK)):
      encoded_image, attributes[i] = source[i]
      encoded.append(encoded_image)
    return encoded

  start_time = last_log = time.perf_counter()
  with futures.ThreadPoolExecutor(1) as reader:  # Reads the next chunk while one decodes.
    pending = reader.submit(read, 0)
    for start in range(0, count, CHUNK):
      end = min(count, start + CHUNK)
      encoded = pending.result()
      pending = reader.submit(read, end) if end < count else None
      chunk = tf.data.Dataset.from_tensor_slices(encoded)
      chunk = chunk.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(CHUNK)
      try:
        images[start:end] = next(iter(chunk)).numpy()
      except tf.errors.InvalidArgumentError as e:  # A stored image the decoder cannot read.
        message = ' '.join(e.message.split())
        raise UserError(
          f'an image of the dataset cannot be decoded ({message[:200]}); prepare the '
          'dataset again from intact files (delete its folder in config.data.data_dir)'
        ) from None
      now = time.perf_counter()
      if folder is not None and (now - last_log > 10 or end == count):
        last_log = now
        logging.info(
          'Prepared %d/%d images at %dpx (%.0f images/s).',
          end,
          count,
          shape[0],
          end / (now - start_time),
        )
  if folder is not None:
    images.flush()
    del images
    np.save(os.path.join(folder, 'attributes.npy'), attributes)
    images = np.load(os.path.join(folder, 'images.npy'), mmap_mode='r')
  return Arrays(images, attributes)
