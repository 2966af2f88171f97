"""The `celeba_files` builder on synthetic CelebA in every supported layout."""

import os
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fdiff_jax.data import CelebaFiles, write_synthetic_celeba
from fdiff_jax.errors import UserError

NUM = 40
SPLITS = {'0': 'train', '1': 'validation', '2': 'test'}


def _prepare(manual_dir, data_dir):
  builder = CelebaFiles(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def _extract_official(zip_dir, out):
  """The official layout with the zip already extracted to img_align_celeba/."""
  os.makedirs(out)
  for name in ('list_attr_celeba.txt', 'list_eval_partition.txt'):
    shutil.copy(os.path.join(zip_dir, name), out)
  with zipfile.ZipFile(os.path.join(zip_dir, 'img_align_celeba.zip')) as z:
    z.extractall(out)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
  out = tmp_path_factory.mktemp('official')
  write_synthetic_celeba(str(out), NUM, seed=1)
  return out


@pytest.fixture(scope='module', params=['official', 'extracted', 'kaggle'])
def prepared(request, official, tmp_path_factory):
  """(manual dir, prepared builder, image bytes by file name) per layout."""
  root = tmp_path_factory.mktemp(request.param)
  manual = root / 'manual'
  if request.param == 'official':
    manual = official
  elif request.param == 'extracted':
    _extract_official(official, manual)
  else:
    write_synthetic_celeba(str(manual), NUM, seed=2, layout='kaggle')
  builder = _prepare(manual, root / 'tfds')
  return manual, builder


def _expected(manual):
  """{file name: (split, attributes, JPEG bytes)}, read from the files."""
  kaggle = (manual / 'list_attr_celeba.csv').exists()
  sep = ',' if kaggle else None
  ext = 'csv' if kaggle else 'txt'
  attr = (manual / f'list_attr_celeba.{ext}').read_text().splitlines()[1 if kaggle else 2 :]
  partition = (manual / f'list_eval_partition.{ext}').read_text().splitlines()[1 if kaggle else 0 :]
  splits = dict(line.split(sep) for line in partition)
  folder = (
    manual / 'img_align_celeba' / 'img_align_celeba' if kaggle else manual / 'img_align_celeba'
  )
  if folder.exists():
    images = {path.name: path.read_bytes() for path in folder.iterdir()}
  else:
    with zipfile.ZipFile(manual / 'img_align_celeba.zip') as z:
      images = {os.path.basename(m): z.read(m) for m in z.namelist()}
  expected = {}
  for line in attr:
    name, *values = line.split(sep)
    expected[name] = (SPLITS[splits[name]], np.array(values, np.float32), images[name])
  return expected


def test_split_sizes_match_the_partition_file(prepared):
  manual, builder = prepared
  expected = _expected(manual)
  for split in SPLITS.values():
    count = sum(s == split for s, _, _ in expected.values())
    assert builder.info.splits[split].num_examples == count
  assert builder.info.splits['train'].num_examples == 32


def test_examples_round_trip(prepared):
  manual, builder = prepared
  expected = _expected(manual)
  seen = []
  for split in SPLITS.values():
    source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    for example in source:
      name = example['file_name'].decode()
      want_split, want_attributes, want_image = expected[name]
      assert split == want_split
      np.testing.assert_array_equal(example['attributes'], want_attributes)
      assert example['image'] == want_image  # Stored as the original JPEG.
      seen.append(name)
  assert sorted(seen) == sorted(expected)


def test_decoded_images_are_aligned_celeba_size(prepared):
  _, builder = prepared
  image = builder.as_data_source('test')[0]['image']
  assert image.shape == (218, 178, 3) and image.dtype == np.uint8
  assert image.std() > 10


def _broken_copy(official, tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(official, manual)
  return manual


@pytest.mark.parametrize(
  'missing', ['list_attr_celeba.txt', 'list_eval_partition.txt', 'img_align_celeba.zip']
)
def test_missing_file_says_which_and_where(official, tmp_path, missing):
  manual = _broken_copy(official, tmp_path)
  os.remove(manual / missing)
  with pytest.raises(UserError, match=f'{missing} or .* not found in {manual}; put'):
    _prepare(manual, tmp_path / 'tfds')


def _edit_line(path, number, edit):
  lines = path.read_text().splitlines()
  lines[number - 1] = edit(lines[number - 1])
  path.write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize(
  'file_name, number, edit',
  [
    ('list_attr_celeba.txt', 7, lambda line: line.replace(' 1', ' 2', 1)),
    ('list_attr_celeba.txt', 9, lambda line: line.rsplit(' ', 1)[0]),
    ('list_attr_celeba.txt', 2, lambda line: line.replace('Male', 'Mal')),
    ('list_attr_celeba.txt', 1, lambda line: '41'),
    ('list_eval_partition.txt', 5, lambda line: line.replace(' 0', ' 3')),
  ],
)
def test_malformed_line_names_file_and_line(official, tmp_path, file_name, number, edit):
  manual = _broken_copy(official, tmp_path)
  _edit_line(manual / file_name, number, edit)
  with pytest.raises(UserError, match=f'{manual / file_name}:{number}: '):
    _prepare(manual, tmp_path / 'tfds')


def test_malformed_kaggle_csv_line(tmp_path):
  manual = tmp_path / 'manual'
  write_synthetic_celeba(str(manual), 5, layout='kaggle')
  _edit_line(manual / 'list_attr_celeba.csv', 4, lambda line: line + ',1')
  with pytest.raises(UserError, match='list_attr_celeba.csv:4: malformed'):
    _prepare(manual, tmp_path / 'tfds')


def test_listed_but_absent_image_is_an_error(official, tmp_path):
  manual = _broken_copy(official, tmp_path)
  archive = manual / 'img_align_celeba.zip'
  with (
    zipfile.ZipFile(official / 'img_align_celeba.zip') as source,
    zipfile.ZipFile(archive, 'w') as target,
  ):
    for member in source.namelist():
      if not member.endswith('000007.jpg'):
        target.writestr(member, source.read(member))
  with pytest.raises(UserError, match=r'1 images .* missing .* 000007\.jpg'):
    _prepare(manual, tmp_path / 'tfds')
  assert not (tmp_path / 'tfds' / 'celeba_files' / '1.0.0').exists()
