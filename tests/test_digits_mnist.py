"""The offline digits builder and MNIST (mocked TFDS) through the pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets

import configs.default
from fdiff_jax import data
from fdiff_jax.data import SklearnDigits
from fdiff_jax.errors import UserError


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(dataset, data_dir, image_size):
  config = configs.default.get_config()
  config.data.dataset = dataset
  config.data.data_dir = data_dir
  config.data.image_size = image_size
  config.data.random_flip = False
  config.data.eval_split = 'test'
  config.train.batch_size = 16
  return config


def test_digits_builder_yields_the_real_1797_images(digits_dir):
  builder = SklearnDigits(data_dir=digits_dir, file_format='array_record')
  builder.download_and_prepare()
  reference = datasets.load_digits()
  scaled = np.round(reference.images * (255 / 16)).astype(np.uint8)
  images, labels = {}, {}
  for split in ('train', 'test'):
    examples = list(builder.as_data_source(split))
    images[split] = np.stack([e['image'][..., 0] for e in examples])
    labels[split] = np.array([e['label'] for e in examples])
    assert set(labels[split]) == set(range(10))
  assert len(labels['train']) == 1578 and len(labels['test']) == 219
  # Both splits keep sklearn's order; together they are all 1,797 images.
  in_test = data.digits.split_of_each_image(reference.target) == 'test'
  np.testing.assert_array_equal(images['test'], scaled[in_test])
  np.testing.assert_array_equal(images['train'], scaled[~in_test])
  np.testing.assert_array_equal(labels['test'], reference.target[in_test])
  assert images['train'].max() == 255


def _check_label_batch(batch, batch_size, size):
  assert batch['image'].shape == (batch_size, size, size, 1)
  assert batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() < batch['image'].max() <= 1
  attributes = batch['attributes']
  assert attributes.shape == (batch_size, 10)
  assert ((attributes == 1).sum(1) == 1).all()
  assert ((attributes == -1).sum(1) == 9).all()


def test_digits_pipeline_upsamples_and_labels(digits_dir):
  config = _config('digits', digits_dir, 16)
  assert data.attribute_names(config) == data.DIGIT_ATTRIBUTES
  assert data.image_shape(config) == (16, 16, 1)
  batch = next(data.create_train_iterator(config))
  _check_label_batch(batch, 16, 16)
  eval_batches = list(data.create_eval_iterator(config))
  assert sum(len(b['image']) for b in eval_batches) == 219
  labels = np.concatenate([b['attributes'] for b in eval_batches]).argmax(1)
  in_test = data.digits.split_of_each_image(datasets.load_digits().target)
  np.testing.assert_array_equal(labels, datasets.load_digits().target[in_test == 'test'])


def test_digits_have_no_validation_split(digits_dir):
  config = _config('digits', digits_dir, 16)
  config.data.eval_split = 'validation'
  with pytest.raises(UserError, match="split 'validation'.*eval_split"):
    next(data.create_eval_iterator(config))


def test_mnist_pipeline_on_mock_data(tmp_path):
  """mock_data mocks `as_data_source`, which is what the pipeline reads."""
  config = _config('mnist', str(tmp_path), 28)
  with tfds.testing.mock_data(num_examples=24):
    assert data.num_examples(config, 'train') == 24
    train = data.create_train_iterator(config)
    for _ in range(3):  # Crosses the epoch boundary (24 examples, 16 a batch).
      _check_label_batch(next(train), 16, 28)
    sizes = [len(b['image']) for b in data.create_eval_iterator(config)]
  assert sizes == [16, 8]
