"""Input pipeline: shapes, range, determinism, exact resume, sharding, eval."""

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import configs.default
from fdiff_jax import data
from fdiff_jax.data import pipeline, sources
from fdiff_jax.errors import UserError

NUM = 40  # 32 train, 4 validation, 4 test.
BATCH = 8


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  data.write_synthetic_celeba(str(root / 'manual'), NUM, seed=5)
  return root


@pytest.fixture
def config(dirs):
  config = configs.default.get_config()
  config.data.dataset = 'celeba'
  config.data.manual_dir = str(dirs / 'manual')
  config.data.data_dir = str(dirs / 'tfds')
  config.data.image_size = 16
  config.data.random_flip = True
  config.train.batch_size = BATCH
  return config


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for a, b in zip(batches, others):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['attributes'], b['attributes'])


def _concat(batches):
  return {key: np.concatenate([b[key] for b in batches]) for key in ('image', 'attributes')}


@pytest.fixture
def processes(monkeypatch):
  """Pretends to be process `index` of `count` (what jax reports per host)."""

  def pretend(index, count):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    monkeypatch.setattr(jax, 'process_count', lambda: count)

  return pretend


def test_shapes_and_value_range(config):
  assert data.image_shape(config) == (16, 16, 3)
  assert data.attribute_names(config) == data.CELEBA_ATTRIBUTES
  batch = next(data.create_train_iterator(config))
  assert batch['image'].shape == (BATCH, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() < -0.5 and 0.5 < batch['image'].max() <= 1
  assert batch['attributes'].shape == (BATCH, 40)
  assert batch['attributes'].dtype == np.float32
  assert set(np.unique(batch['attributes'])) == {-1.0, 1.0}


def test_same_seed_same_batches_other_seed_differs(config):
  first = _take(data.create_train_iterator(config), 6)  # 1.5 epochs.
  _assert_same(first, _take(data.create_train_iterator(config), 6))
  config.seed = 1
  other = _take(data.create_train_iterator(config), 6)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_each_epoch_is_a_permutation_of_the_split(config):
  config.data.random_flip = False
  epoch = _concat(_take(data.create_train_iterator(config), 32 // BATCH))
  stored = _concat(list(data.create_eval_iterator(config, split='train')))

  def rows(batch):
    return sorted(map(bytes, batch['image'].reshape(32, -1)))

  assert rows(epoch) == rows(stored)
  assert not np.array_equal(epoch['image'], stored['image'])  # Shuffled.


@pytest.mark.parametrize('start_step', [1, 3, 5])
def test_resume_at_step_equals_skipping(config, start_step):
  reference = _take(data.create_train_iterator(config), start_step + 3)
  resumed = _take(data.create_train_iterator(config, start_step=start_step), 3)
  _assert_same(reference[start_step:], resumed)


class _CountingImages:
  """The prepared images, recording which rows are read."""

  def __init__(self, images):
    self.images, self.rows = images, []

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    self.rows.extend(np.atleast_1d(index).tolist())
    return self.images[index]


def test_resume_does_not_read_the_skipped_batches(config):
  arrays = pipeline.open_arrays(config, 'train')
  counting = _CountingImages(arrays.images)
  batches = data.create_train_iterator(
    config, start_step=10_000, arrays=pipeline.Arrays(counting, arrays.attributes)
  )
  next(batches)
  batches.close()
  assert 0 < len(counting.rows) < 1000  # Skipping replayed would be 80,000 reads.


def test_flip_mirrors_some_images_and_keeps_attributes(config):
  flipped = _concat(_take(data.create_train_iterator(config), 4))
  config.data.random_flip = False
  plain = _concat(_take(data.create_train_iterator(config), 4))
  np.testing.assert_array_equal(flipped['attributes'], plain['attributes'])
  pairs = list(zip(flipped['image'], plain['image']))
  same = [np.array_equal(f, p) for f, p in pairs]
  mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in pairs]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 0 < sum(mirrored) < 32 and 0 < sum(same) < 32


def test_processes_read_disjoint_parts_of_each_global_batch(config, processes):
  single = _take(data.create_train_iterator(config, start_step=2), 4)
  parts = []
  for index in range(2):
    processes(index, 2)
    parts.append(_take(data.create_train_iterator(config, start_step=2), 4))
  for step, whole in enumerate(single):
    assert parts[0][step]['image'].shape[0] == BATCH // 2
    _assert_same([whole], [_concat([parts[0][step], parts[1][step]])])


def test_batch_must_split_evenly_over_processes(config, processes):
  processes(0, 3)
  with pytest.raises(UserError, match='not divisible by the 3 processes'):
    data.create_train_iterator(config)


def test_eval_is_one_ordered_pass_keeping_the_last_batch(config):
  batches = list(data.create_eval_iterator(config, batch_size=3))
  assert [len(b['image']) for b in batches] == [3, 1]
  again = list(data.create_eval_iterator(config, batch_size=3))
  _assert_same(batches, again)
  source = sources.open_split(config, 'validation')
  attributes = np.stack([source[i][1] for i in range(len(source))])
  np.testing.assert_array_equal(_concat(batches)['attributes'], attributes)
  assert data.num_examples(config, 'validation') == 4


@pytest.mark.parametrize(
  'global_batch, sizes',
  [
    (2, [[1, 1], [1, 1]]),  # 4 examples, 2 processes of 1.
    (6, [[3], [1]]),
    (8, [[4], [0]]),  # Process 1 gets an empty batch, same batch count.
  ],
)
def test_eval_shards_keep_batch_counts_equal(config, processes, global_batch, sizes):
  whole = _concat(list(data.create_eval_iterator(config, batch_size=global_batch)))
  parts = []
  for index in range(2):
    processes(index, 2)
    batches = list(data.create_eval_iterator(config, batch_size=global_batch))
    assert [len(b['image']) for b in batches] == sizes[index]
    assert all(b['image'].shape[1:] == (16, 16, 3) for b in batches)
    parts.append(batches)
  interleaved = [b for step in zip(*parts) for b in step]
  _assert_same([whole], [_concat(interleaved)])


def test_preprocess_center_crops_instead_of_squashing(config):
  image = np.zeros((218, 178, 3), np.uint8)
  image[:20] = image[-20:] = 255  # Outside the central 178x178 square.
  image[20:198, :89, 0] = 255  # Left half red.
  out = data.preprocess_image(image, config)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, :6, 0], 1, atol=1e-5)
  np.testing.assert_allclose(out[:, 10:, 0], -1, atol=1e-5)
  np.testing.assert_allclose(out[..., 1:], -1, atol=1e-5)  # No white rows.


def test_preprocess_rejects_wrong_channels(config):
  with pytest.raises(UserError, match='uint8 HxWx3'):
    data.preprocess_image(np.zeros((20, 20), np.uint8), config)


def _prepared_folders(config, split):
  size = config.data.image_size
  pattern = f'fdiff_prepared/celeba_files/*/{split}-{size}px-*'
  return sorted(map(str, (Path(config.data.data_dir)).glob(pattern)))


def test_changed_manual_files_are_prepared_again(config, tmp_path):
  config.data.manual_dir = str(tmp_path / 'manual')
  config.data.data_dir = str(tmp_path / 'tfds')
  data.write_synthetic_celeba(config.data.manual_dir, NUM)
  assert data.num_examples(config, 'train') == 32
  first = pipeline.open_arrays(config, 'train')
  assert len(first) == 32
  [first_folder] = _prepared_folders(config, 'train')
  data.write_synthetic_celeba(config.data.manual_dir, 50)
  assert data.num_examples(config, 'train') == 40
  again = pipeline.open_arrays(config, 'train')
  assert len(again) == 40 and len(again.attributes) == 40
  assert _prepared_folders(config, 'train') != [first_folder]  # The old arrays are gone.
  assert len(_prepared_folders(config, 'train')) == 1


def test_prepared_arrays_hold_the_preprocessed_images(config):
  arrays = pipeline.open_arrays(config, 'validation')
  source = sources.open_split(config, 'validation')
  assert arrays.images.shape == (4, 16, 16, 3) and arrays.images.dtype == np.uint8
  assert isinstance(arrays.images, np.memmap)  # Read from disk, not kept in memory.
  for i in range(len(source)):
    encoded, attributes = source[i]
    decoded = tf.io.decode_image(encoded, channels=3).numpy()
    expected = np.round((data.preprocess_image(decoded, config) + 1) * 127.5)
    np.testing.assert_array_equal(arrays.images[i], expected.astype(np.uint8))
    np.testing.assert_array_equal(arrays.attributes[i], attributes)
  batch = next(data.create_eval_iterator(config, batch_size=4))
  np.testing.assert_allclose(batch['image'], arrays.images / 127.5 - 1, atol=1e-6)


def test_a_leftover_temporary_folder_is_ignored_and_removed(config):
  arrays = pipeline.open_arrays(config, 'test')
  [folder] = _prepared_folders(config, 'test')
  leftover = Path(folder).parent / f'.tmp-test-16px-{os.getpid() + 1}'
  shutil.copytree(folder, leftover)
  with open(leftover / 'images.npy', 'r+b') as f:  # Half written.
    f.truncate(os.path.getsize(leftover / 'images.npy') // 2)
  shutil.rmtree(folder)
  again = pipeline.open_arrays(config, 'test')
  np.testing.assert_array_equal(again.images, arrays.images)
  assert not leftover.exists() and _prepared_folders(config, 'test') == [folder]


def test_an_interrupted_preparation_leaves_nothing_that_loads(config, monkeypatch):
  config.data.image_size = 8  # Not prepared yet at this size.
  original = sources.Split.__getitem__

  def interrupted(self, index):
    if index == 20:
      raise KeyboardInterrupt
    return original(self, index)

  monkeypatch.setattr(sources.Split, '__getitem__', interrupted)
  with pytest.raises(KeyboardInterrupt):
    pipeline.open_arrays(config, 'train')
  root = Path(config.data.data_dir) / 'fdiff_prepared'
  assert not list(root.glob('*/*/train-8px-*')) and not list(root.glob('*/*/.tmp-*'))
  monkeypatch.setattr(sources.Split, '__getitem__', original)
  assert pipeline.open_arrays(config, 'train').images.shape == (32, 8, 8, 3)


def test_flips_are_keyed_by_seed_and_position(config):
  def mirrored(seed, start_step, steps=4):
    """Which images of `steps` batches from `start_step` are mirrored."""
    config.seed = seed
    config.data.random_flip = False
    plain = _take(data.create_train_iterator(config, start_step=start_step), steps)
    config.data.random_flip = True
    flipped = _take(data.create_train_iterator(config, start_step=start_step), steps)
    images = zip(_concat(flipped)['image'], _concat(plain)['image'])
    return [not np.array_equal(a, b) for a, b in images]

  assert mirrored(0, 4) == mirrored(0, 4) == mirrored(0, 0, steps=8)[4 * BATCH :]
  assert mirrored(0, 4) != mirrored(0, 0)  # Other positions.
  assert mirrored(0, 4) != mirrored(1, 4)  # Other seed.


@pytest.mark.parametrize(
  'manual_dir, message',
  [
    ('', 'needs config.data.manual_dir'),
    ('/nonexistent/celeba', "'/nonexistent/celeba' does not exist"),
  ],
)
def test_celeba_without_files_is_a_user_error(config, manual_dir, message):
  config.data.manual_dir = manual_dir
  with pytest.raises(UserError, match=message):
    data.create_train_iterator(config)


def test_process_exits_with_live_iterators(config):
  """A live pipeline at exit used to deadlock Python's shutdown."""
  script = textwrap.dedent(f"""
      import configs.default
      from fdiff_jax import data
      config = configs.default.get_config()
      config.data.manual_dir = {config.data.manual_dir!r}
      config.data.data_dir = {config.data.data_dir!r}
      config.train.batch_size = 4
      train = data.create_train_iterator(config)
      evaluation = data.create_eval_iterator(config)
      next(train), next(evaluation)
      print('ok')
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, '-c', script],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[-1] == 'ok'


def test_unknown_dataset_is_a_user_error(config):
  config.data.dataset = 'imagenet'
  with pytest.raises(UserError, match='use one of digits, mnist'):
    data.attribute_names(config)


def test_tfds_celeb_a_maps_to_the_same_40_attributes(config, tmp_path):
  config.data.dataset = 'celeb_a'
  config.data.data_dir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=8):
    batch = next(data.create_train_iterator(config))
    source = tfds.builder('celeb_a').as_data_source('train')
    flags = source[0]['attributes']
  assert batch['image'].shape == (BATCH, 16, 16, 3)
  assert set(np.unique(batch['attributes'])) <= {-1.0, 1.0}
  expected = [1 if flags[name] else -1 for name in data.CELEBA_ATTRIBUTES]
  np.testing.assert_array_equal(
    sources.DATASETS['celeb_a'].to_attributes({'attributes': flags}), expected
  )
