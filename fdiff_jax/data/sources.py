"""Opens a dataset split for random access: (encoded image, attributes).

Every dataset (digits, mnist, celeba, celeb_a) is prepared once as TFDS
`array_record` files and read by index, which is what lets the pipeline
shuffle, shard and resume without reading through earlier examples.
"""

import contextlib
import dataclasses
import os
import shutil
import socket
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core.download import download_manager

from fdiff_jax.data import celeba, digits
from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES, DIGIT_ATTRIBUTES
from fdiff_jax.errors import UserError

_SKIP_IMAGE_DECODING = {'image': tfds.decode.SkipDecoding()}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about one `config.data.dataset`."""

  attribute_names: tuple[str, ...]
  channels: int
  crop_to_square: bool  # CelebA's 218x178 faces are center-cropped.
  prepare: Callable[[str, str | None], tfds.core.DatasetBuilder]
  to_attributes: Callable[[dict], np.ndarray]


class Split:
  """One split, indexable: `split[i]` -> (encoded image bytes, float32 [A]).

  `data_dir` is the folder of the prepared TFDS files it reads ('' when there
  are none on disk, e.g. under `tfds.testing.mock_data`).
  """

  def __init__(self, data_source, to_attributes, data_dir: str = ''):
    self._data_source = data_source
    self._to_attributes = to_attributes
    self.data_dir = data_dir

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> tuple[bytes, np.ndarray]:
    example = self._data_source[int(index)]
    return example['image'], self._to_attributes(example)


def _label_attributes(example: dict) -> np.ndarray:
  """Class label -> +1 for that digit, -1 for the other nine."""
  return np.where(np.arange(10) == example['label'], 1, -1).astype(np.float32)


def _celeb_a_attributes(example: dict) -> np.ndarray:
  """TFDS celeb_a's dict of booleans -> the 40 +-1 values in official order."""
  flags = example['attributes']
  return np.array([1 if flags[name] else -1 for name in CELEBA_ATTRIBUTES], np.float32)


def _not_tfds_noise(record) -> bool:
  """False for TFDS's warning about the empty folder of a dataset not prepared yet."""
  return 'has no dataset_info.json' not in record.getMessage()


@contextlib.contextmanager
def _quiet_tfds():
  """Hides TFDS progress bars (they flood non-TTY logs) and its not-prepared-yet warning."""
  tfds.display_progress_bar(False)
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(_not_tfds_noise)
  try:
    yield
  finally:
    absl_logger.removeFilter(_not_tfds_noise)
    tfds.display_progress_bar(True)


# Where TFDS catalog datasets download from; checked before a download starts.
TFDS_DOWNLOAD_HOST = ('storage.googleapis.com', 443)


def _check_reachable(name, data_dir):
  """A UserError at once when the download host is unreachable (TFDS would retry for minutes)."""
  try:
    socket.create_connection(TFDS_DOWNLOAD_HOST, timeout=5).close()
  except OSError as e:
    raise UserError(
      f'TFDS {name} is not prepared in {data_dir or "~/tensorflow_datasets"} and downloading '
      f'it needs a network ({TFDS_DOWNLOAD_HOST[0]} is unreachable: {e}); connect to the '
      'internet once, or set config.data.data_dir to a folder where it is prepared'
    ) from None


def _downloads(builder):
  """Whether `download_and_prepare` is TFDS's own (`tfds.testing.mock_data` replaces it)."""
  method = type(builder).download_and_prepare
  return method.__module__.startswith('tensorflow_datasets.core')


def _prepare_tfds(name):
  """Returns a `prepare` for a TFDS catalog dataset (downloads once)."""

  def prepare(manual_dir, data_dir):
    del manual_dir  # Catalog datasets download their own files.
    with _quiet_tfds():
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared() and _downloads(builder):
        _check_reachable(name, data_dir)
    try:
      with _quiet_tfds():
        builder.download_and_prepare()
    except (download_manager.NonMatchingChecksumError, tfds.download.DownloadError, OSError) as e:
      hint = (
        ' (for CelebA download the files by hand and use config.data.dataset = celeba)'
        if name == 'celeb_a'
        else ''
      )
      raise UserError(f'could not download TFDS {name}{hint}: {e}'.replace('\n', ' ')) from e
    return builder

  return prepare


def _prepare_digits(manual_dir, data_dir):
  del manual_dir  # The digits ship with scikit-learn.
  builder = digits.SklearnDigits(data_dir=data_dir, file_format='array_record')
  with _quiet_tfds():
    builder.download_and_prepare()
  return builder


def _prepare_celeba(manual_dir, data_dir):
  """Prepares `celeba_files` once, and again when the manual files change.

  The prepared copy records `celeba.manual_fingerprint`; a mismatch (edited
  attribute/partition file, replaced zip or folder) rebuilds it in place.
  """
  if not manual_dir:
    raise UserError(
      'config.data.dataset = celeba needs config.data.manual_dir, a folder with'
      ' img_align_celeba.zip, list_attr_celeba.txt and'
      ' list_eval_partition.txt (or `fdiff data synth-celeba DIR` for a'
      ' synthetic one).'
    )
  fingerprint = celeba.manual_fingerprint(manual_dir)
  with _quiet_tfds():
    builder = celeba.CelebaFiles(data_dir=data_dir, file_format='array_record')
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    if builder.info.metadata.get('manual_fingerprint') == fingerprint:
      return builder
    logging.warning(
      'CelebA files in %s changed since %s was prepared; preparing it again.',
      manual_dir,
      builder.data_dir,
    )
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  # TFDS makes these folders even for manual files; a refused preparation keeps none of them.
  made = [
    path
    for path in (os.path.join(builder.data_dir_root, d) for d in ('downloads', builder.name))
    if '://' not in path and not os.path.exists(path)  # Local data_dirs only.
  ]
  try:
    with _quiet_tfds():
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
      )
  except BaseException:
    for path in made:
      if not any(files for _, _, files in os.walk(path)):
        shutil.rmtree(path, ignore_errors=True)
    raise
  return celeba.CelebaFiles(data_dir=data_dir, file_format='array_record')


DATASETS = {
  'digits': DatasetSpec(DIGIT_ATTRIBUTES, 1, False, _prepare_digits, _label_attributes),
  'mnist': DatasetSpec(DIGIT_ATTRIBUTES, 1, False, _prepare_tfds('mnist'), _label_attributes),
  'celeba': DatasetSpec(
    CELEBA_ATTRIBUTES, 3, True, _prepare_celeba, lambda example: example['attributes']
  ),
  'celeb_a': DatasetSpec(CELEBA_ATTRIBUTES, 3, True, _prepare_tfds('celeb_a'), _celeb_a_attributes),
}


def dataset_spec(config) -> DatasetSpec:
  """The spec of `config.data.dataset`, or a UserError naming the valid ones."""
  name = config.data.dataset
  if name not in DATASETS:
    raise UserError(f"unknown config.data.dataset '{name}'; use one of {', '.join(DATASETS)}.")
  return DATASETS[name]


def open_split(config, split: str) -> Split:
  """Prepares the configured dataset if needed and opens `split` by index."""
  spec = dataset_spec(config)
  builder = spec.prepare(config.data.manual_dir, config.data.data_dir or None)
  try:
    data_source = builder.as_data_source(split, decoders=_SKIP_IMAGE_DECODING)
  except ValueError as e:
    raise UserError(
      f"cannot open split '{split}' of {config.data.dataset} (prepared in"
      f' {builder.data_dir}): {e} Set config.data.train_split /'
      ' config.data.eval_split to an existing split.'.replace('\n', ' ')
    ) from e
  return Split(data_source, spec.to_attributes, str(builder.data_dir))
