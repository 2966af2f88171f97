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
  synth_celeba,
  write_synthetic_celeba,
)
from fdiff_jax.data.synth_celeba import luminance, sample_attributes

NUM = 40
# Where flipping each attribute may change pixels: rows y0:y1, columns x0:x1
# (pose, scale and offset jitter included).
HAIR = (16, 212, 8, 170)
REGIONS = {
  'Male': (0, 218, 0, 178),
  'Young': (75, 172, 32, 146),
  'Bald': HAIR,
  'Black_Hair': HAIR,
  'Blond_Hair': HAIR,
  'Brown_Hair': HAIR,
  'Gray_Hair': HAIR,
  'Bangs': (70, 114, 30, 148),
  'Mustache': (125, 160, 50, 128),
  'Goatee': (150, 190, 60, 118),
  'Smiling': (134, 180, 50, 128),
  'Mouth_Slightly_Open': (134, 180, 50, 128),
  'Wearing_Lipstick': (134, 180, 50, 128),
  'Pale_Skin': (70, 200, 14, 164),
  'Eyeglasses': (88, 136, 34, 144),
  'Wearing_Hat': (14, 100, 0, 178),
}
EXCLUSIVE = (*synth_celeba.HAIR_COLOURS, 'Bald')  # exactly one per face


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
  assert set(np.unique(values)) == {-1, 1}

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


@pytest.mark.parametrize('name', sorted(REGIONS))
@pytest.mark.parametrize('identity', range(4))
def test_each_attribute_changes_its_own_pixels(name, identity):
  base = sample_attributes(np.random.default_rng(identity))
  if name in EXCLUSIVE or name == 'Bangs':  # Bangs need hair; a colour is drawn alone.
    base.update({other: False for other in EXCLUSIVE})
  without = render_face({**base, name: False}, identity)
  with_ = render_face({**base, name: True}, identity)
  changed = np.any(without != with_, axis=-1)
  assert changed.sum() >= 200
  y0, y1, x0, x1 = REGIONS[name]
  assert not changed[:y0].any() and not changed[y1:].any()
  assert not changed[:, :x0].any() and not changed[:, x1:].any()
  assert np.abs(_small(without) - _small(with_)).max() >= 40


# The least luminance change (0-255) that each small feature makes somewhere in the
# 32x32 image on every face: skin tones from dark to pale, every hair colour and Bald.
VISIBLE_AT_32 = {'Mustache': 45, 'Goatee': 45, 'Smiling': 15, 'Mouth_Slightly_Open': 20}


@pytest.mark.parametrize('name', sorted(VISIBLE_AT_32))
def test_small_features_stand_out_at_32_on_every_skin_and_hair(name):
  for identity in range(12):
    for hair in EXCLUSIVE:
      for pale in (False, True):
        base = {'Male': True, 'Young': True, hair: True, 'Pale_Skin': pale}
        change = np.abs(
          luminance(_small(render_face(base, identity)))
          - luminance(_small(render_face({**base, name: True}, identity)))
        )
        assert change.max() >= VISIBLE_AT_32[name], (identity, hair, pale, change.max())


def test_no_beard_is_not_drawn_but_derived():
  a = sample_attributes(np.random.default_rng(0))
  assert np.array_equal(render_face({**a, 'No_Beard': True}, 5), render_face(a, 5))


def test_identity_controls_the_rest():
  a = render_face({'Smiling': True}, 0)
  assert np.array_equal(a, render_face({'Smiling': True}, 0))
  # Same attributes, other people: far more differs than a single attribute's flip.
  attrs = sample_attributes(np.random.default_rng(1))
  people = [_small(render_face(attrs, i)) for i in range(6)]
  flip = _small(render_face({**attrs, 'Smiling': not attrs['Smiling']}, 0))
  flip_distance = np.abs(people[0] - flip).mean()
  for i in range(1, 6):
    assert np.abs(people[0] - people[i]).mean() > 4 * flip_distance


@pytest.fixture(scope='module')
def population():
  """60,000 sampled attribute combinations as a name -> bool array table."""
  rng = np.random.default_rng(0)
  rows = [sample_attributes(rng) for _ in range(60_000)]
  return {name: np.array([r[name] for r in rows]) for name in RENDERED_ATTRIBUTES}


# CelebA's positive rates (list_attr_celeba.txt), which the sampler follows; the
# hair colours are scaled up together because every face has one (module docstring).
CELEBA_RATES = {
  'Male': 0.417,
  'Young': 0.774,
  'Smiling': 0.482,
  'Mouth_Slightly_Open': 0.483,
  'Wearing_Lipstick': 0.472,
  'Bangs': 0.152,
  'Eyeglasses': 0.065,
  'Wearing_Hat': 0.048,
  'Mustache': 0.042,
  'Goatee': 0.063,
  'Pale_Skin': 0.043,
  'Gray_Hair': 0.042,
  'Bald': 0.022,
}


def test_rates_follow_celeba(population):
  for name, rate in CELEBA_RATES.items():
    assert abs(population[name].mean() - rate) < 0.15 * rate + 0.005, name
  black, brown, blond = (population[c].mean() for c in ('Black_Hair', 'Brown_Hair', 'Blond_Hair'))
  total = black + brown + blond
  np.testing.assert_allclose(
    [black / total, brown / total, blond / total], [0.40, 0.35, 0.25], atol=0.03
  )


def test_dependencies_follow_celeba(population):
  p = population
  assert (sum(p[c].astype(int) for c in EXCLUSIVE) == 1).all()  # one hair colour or Bald
  assert (p['No_Beard'] == ~(p['Mustache'] | p['Goatee'])).all()
  assert p['Male'][p['Mustache']].mean() > 0.95 and p['Male'][p['Goatee']].mean() > 0.95
  assert p['Male'][p['Bald']].mean() > 0.95 and not (p['Bald'] & p['Bangs']).any()
  assert p['Wearing_Lipstick'][p['Male']].mean() < 0.02
  assert p['Wearing_Lipstick'][~p['Male']].mean() > 0.7
  assert p['Young'][p['Gray_Hair']].mean() < 0.3
  assert p['Blond_Hair'][~p['Male']].mean() > 2 * p['Blond_Hair'][p['Male']].mean()
  open_smile = p['Mouth_Slightly_Open'][p['Smiling']].mean()
  assert open_smile > 2 * p['Mouth_Slightly_Open'][~p['Smiling']].mean()


def test_cli_writes_the_official_files(tmp_path):
  out = str(tmp_path / 'synth')
  assert cli.main(['data', 'synth-celeba', out, '--num', '5', '--seed', '3']) == 0
  assert sorted(os.listdir(out)) == [
    'img_align_celeba.zip',
    'list_attr_celeba.txt',
    'list_eval_partition.txt',
  ]
