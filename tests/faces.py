"""Synthetic CelebA files and the tiny test config pointed at them, shared by the test modules."""

from configs import test as test_config
from fdiff_jax.data.synth_celeba import write_synthetic_celeba


def synthetic_celeba(root, num, seed=0):
  """(manual_dir, data_dir) of `num` synthetic faces written under `root`."""
  write_synthetic_celeba(str(root / 'files'), num=num, seed=seed)
  return str(root / 'files'), str(root / 'tfds')


def config_on(dirs, **train):
  """configs/test.py reading the faces of `dirs`, with `train` overrides."""
  config = test_config.get_config()
  config.data.manual_dir, config.data.data_dir = dirs
  config.train.update(train)
  return config
