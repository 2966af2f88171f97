"""Synthetic CelebA: official and Kaggle layouts, attribute-driven pixels."""

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from fdiff_jax import cli
from fdiff_jax.data import (
  CELEBA_ATTRIBUTES,
  RENDERED_ATTRIBUTES,
  render_face,
  write_synthetic_celeba,
)
from fdiff_jax.data.synth_celeba import sample_attributes

NUM = 40
# Where flipping each attribute may change pixels: rows y0:y1, columns x0:x1.
REGIONS = {
  'Male': (35, 218, 10, 168),
  'Smiling': (140, 190, 50, 130),
  'Eyeglasses': (90, 142, 40, 140),
  'Black_Hair': (35, 218, 10, 168),
  'Blond_Hair': (35, 218, 10, 168),
  'Pale_Skin': (50, 200, 25, 155),
  'Wearing_Hat': (10, 90, 5, 173),
  'Mustache': (135, 165, 50, 130),
  'Bangs': (50, 108, 35, 145),
  'Young': (70, 170, 45, 135),
}
# The middle of the face, which hair, hats and face shape leave alone.
FACE_CENTER = (105, 150, 70, 110)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('official'))
  write_synthetic_celeba(out, NUM, seed=3)
  return out


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def test_official_layout(official):
  assert sorted(os.listdir(official)) == [
    'img_align_celeba.zip',
    'list_attr_celeba.txt',
    'list_eval_partition.txt',
  ]
  with zipfile.ZipFile(os.path.join(official, 'img_align_celeba.zip')) as z:
    names = z.namelist()
    image = Image.open(io.BytesIO(z.read(names[0])))
  assert names == [f'img_align_celeba/{i:06d}.jpg' for i in range(1, NUM + 1)]
  assert image.format == 'JPEG' and image.size == (178, 218)
  assert image.mode == 'RGB'

  attr = _lines(os.path.join(official, 'list_attr_celeba.txt'))
  assert attr[0] == str(NUM)
  assert attr[1].split() == list(CELEBA_ATTRIBUTES)
  assert len(attr) == NUM + 2
  assert attr[2].startswith('000001.jpg ')
  assert '  1' in ''.join(attr[2:])  # Official rows pad +1 to width 2.
  values = np.array([row.split()[1:] for row in attr[2:]], int)
  assert values.shape == (NUM, 40)
  rendered = [CELEBA_ATTRIBUTES.index(a) for a in RENDERED_ATTRIBUTES]
  others = np.delete(values, rendered, axis=1)
  assert (others == -1).all()
  for column in rendered:  # Each rendered attribute takes both values.
    assert set(values[:, column]) == {-1, 1}

  partition = [line.split() for line in _lines(os.path.join(official, 'list_eval_partition.txt'))]
  assert [name for name, _ in partition] == [f'{i:06d}.jpg' for i in range(1, NUM + 1)]
  splits = [int(p) for _, p in partition]
  assert splits == [0] * 32 + [1] * 4 + [2] * 4


def test_kaggle_layout(tmp_path):
  write_synthetic_celeba(str(tmp_path), 5, seed=3, layout='kaggle')
  attr = _lines(tmp_path / 'list_attr_celeba.csv')
  assert attr[0] == 'image_id,' + ','.join(CELEBA_ATTRIBUTES)
  assert attr[1].startswith('000001.jpg,') and len(attr[1].split(',')) == 41
  assert _lines(tmp_path / 'list_eval_partition.csv') == [
    'image_id,partition',
    '000001.jpg,0',
    '000002.jpg,0',
    '000003.jpg,0',
    '000004.jpg,1',
    '000005.jpg,2',
  ]
  folder = tmp_path / 'img_align_celeba' / 'img_align_celeba'
  assert sorted(os.listdir(folder)) == [f'{i:06d}.jpg' for i in range(1, 6)]


def test_same_seed_same_files_other_seed_differs(official, tmp_path):
  write_synthetic_celeba(str(tmp_path / 'same'), NUM, seed=3)
  write_synthetic_celeba(str(tmp_path / 'other'), NUM, seed=4)
  for name in os.listdir(official):
    with open(os.path.join(official, name), 'rb') as f:
      reference = f.read()
    assert (tmp_path / 'same' / name).read_bytes() == reference
  assert (tmp_path / 'other' / 'list_attr_celeba.txt').read_bytes() != (
    tmp_path / 'same' / 'list_attr_celeba.txt'
  ).read_bytes()


def _small(image):
  """What the pipeline sees at 32x32: center square, downsampled."""
  return np.asarray(Image.fromarray(image[20:198]).resize((32, 32), Image.BOX), np.int32)


@pytest.mark.parametrize('name', RENDERED_ATTRIBUTES)
@pytest.mark.parametrize('identity', range(4))
def test_each_attribute_changes_its_own_pixels(name, identity):
  base = {} if identity == 0 else sample_attributes(np.random.default_rng(identity))
  without = render_face({**base, name: False}, identity)
  with_ = render_face({**base, name: True}, identity)
  changed = np.any(without != with_, axis=-1)
  assert changed.sum() >= 300
  y0, y1, x0, x1 = REGIONS[name]
  assert not changed[:y0].any() and not changed[y1:].any()
  assert not changed[:, :x0].any() and not changed[:, x1:].any()
  if name in ('Male', 'Black_Hair', 'Blond_Hair', 'Wearing_Hat', 'Bangs'):
    y0, y1, x0, x1 = FACE_CENTER
    assert not changed[y0:y1, x0:x1].any()
  assert np.abs(_small(without) - _small(with_)).max() >= 40


def test_identity_controls_the_rest():
  a = render_face({'Smiling': True}, 0)
  assert np.array_equal(a, render_face({'Smiling': True}, 0))
  assert not np.array_equal(a, render_face({'Smiling': True}, 1))


def test_cli_writes_the_official_files(tmp_path):
  out = str(tmp_path / 'synth')
  assert cli.main(['data', 'synth-celeba', out, '--num', '5', '--seed', '3']) == 0
  assert sorted(os.listdir(out)) == [
    'img_align_celeba.zip',
    'list_attr_celeba.txt',
    'list_eval_partition.txt',
  ]
