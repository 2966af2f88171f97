"""TFDS builder `sklearn_digits`: the 1,797 real 8x8 digits scikit-learn ships.

Lets the quickstart train on real data with no network. Split (deterministic,
stratified): within each class, every 8th image in file order (ranks 7, 15,
...) goes to 'test' (219 images, 12%), the rest to 'train' (1,578). There is
no 'validation' split: configs for digits set `data.eval_split = 'test'`.
"""

import numpy as np
import tensorflow_datasets as tfds
from sklearn import datasets

TEST_EVERY = 8  # Every TEST_EVERY-th image of each class is held out.


def split_of_each_image(labels: np.ndarray) -> np.ndarray:
  """Returns 'train' or 'test' per image, held out by within-class rank."""
  rank = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank[members] = np.arange(len(members))
  return np.where(rank % TEST_EVERY == TEST_EVERY - 1, 'test', 'train')


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """UCI handwritten digits (8x8 grayscale, 0..16 scaled to 0..255)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://archive.ics.uci.edu/dataset/80',
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    splits = split_of_each_image(digits.target)
    return {
      split: self._generate_examples(images[splits == split], digits.target[splits == split])
      for split in ('train', 'test')
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
