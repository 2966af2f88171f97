"""TFDS builder `celeba_files`: CelebA from files the user downloaded by hand.

Reads the official layout (`img_align_celeba.zip` or the extracted
`img_align_celeba/`, `list_attr_celeba.txt`, `list_eval_partition.txt`) or the
Kaggle one (`list_attr_celeba.csv`, `list_eval_partition.csv`,
`img_align_celeba/img_align_celeba/`). TFDS's own `celeb_a` downloads from
Google Drive, which fails for most people; this path needs no network.
"""

import dataclasses
import hashlib
import io
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES
from fdiff_jax.errors import UserError

_SPLITS = {'0': 'train', '1': 'validation', '2': 'test'}
_HOW = (
  'put the official CelebA files (img_align_celeba.zip,'
  ' list_attr_celeba.txt, list_eval_partition.txt) or the Kaggle ones'
  ' there'
)


@dataclasses.dataclass(frozen=True)
class CelebaPaths:
  """Where the attribute file, partition file and images were found."""

  attributes: str
  partition: str
  images: str  # A .zip file or a folder of JPEGs.


def locate_files(manual_dir: str) -> CelebaPaths:
  """Finds the CelebA files in `manual_dir`: official layout, else Kaggle."""
  if not manual_dir or not os.path.isdir(manual_dir):
    raise UserError(
      f"CelebA folder '{manual_dir}' does not exist; {_HOW} and set config.data.manual_dir to it."
    )

  def first(*names):
    for name in names:
      path = os.path.join(manual_dir, name)
      if os.path.exists(path):
        return path
    raise UserError(f'{" or ".join(names)} not found in {manual_dir}; {_HOW}.')

  return CelebaPaths(
    attributes=first('list_attr_celeba.txt', 'list_attr_celeba.csv'),
    partition=first('list_eval_partition.txt', 'list_eval_partition.csv'),
    images=first(
      'img_align_celeba.zip',
      os.path.join('img_align_celeba', 'img_align_celeba'),
      'img_align_celeba',
    ),
  )


def read_attributes(path: str) -> dict[str, list[int]]:
  """Reads `list_attr_celeba.txt` or `.csv`: {file name: 40 values of +-1}."""
  csv = path.endswith('.csv')
  with open(path) as f:
    lines = f.read().splitlines()
  if csv:  # Header `image_id,5_o_Clock_Shadow,...`.
    names_line = 1
    names = [n.strip() for n in lines[0].split(',')[1:]] if lines else []
  else:  # An image count, then the names.
    names_line = 2
    names = lines[1].split() if len(lines) > 1 else []
  if tuple(names) != CELEBA_ATTRIBUTES:
    raise UserError(
      f'{path}:{names_line}: expected the 40 CelebA'
      ' attribute names in official order; re-download the'
      ' file.'
    )
  table = {}
  for number, line in enumerate(lines[names_line:], names_line + 1):
    if not line.strip():
      continue
    fields = [x.strip() for x in line.split(',')] if csv else line.split()
    if len(fields) != 41 or any(v not in ('1', '-1') for v in fields[1:]):
      raise UserError(
        f'{path}:{number}: malformed line (want an image name'
        ' and 40 values of 1 or -1); fix or re-download the'
        ' file.'
      )
    if fields[0] in table:
      raise UserError(f'{path}:{number}: {fields[0]} is listed twice; fix or re-download the file.')
    table[fields[0]] = [int(v) for v in fields[1:]]
  if not csv and lines[0].strip() != str(len(table)):
    raise UserError(
      f'{path}:1: says {lines[0].strip()!r} images but lists'
      f' {len(table)}; fix or re-download the file.'
    )
  return table


def read_partition(path: str) -> dict[str, str]:
  """Reads `list_eval_partition.txt` or `.csv` into {file name: split name}."""
  csv = path.endswith('.csv')
  with open(path) as f:
    lines = f.read().splitlines()
  if csv and (not lines or lines[0].replace(' ', '') != 'image_id,partition'):
    raise UserError(
      f"{path}:1: expected the header 'image_id,partition'; fix or re-download the file."
    )
  partition = {}
  for number, line in enumerate(lines[csv:], 1 + csv):
    if not line.strip():
      continue
    fields = [x.strip() for x in line.split(',')] if csv else line.split()
    if len(fields) != 2 or fields[1] not in _SPLITS:
      raise UserError(
        f'{path}:{number}: malformed line (want an image name'
        ' and 0, 1 or 2); fix or re-download the file.'
      )
    if fields[0] in partition:
      raise UserError(f'{path}:{number}: {fields[0]} is listed twice; fix or re-download the file.')
    partition[fields[0]] = _SPLITS[fields[1]]
  return partition


def manual_fingerprint(manual_dir: str) -> str:
  """Hash of what the prepared dataset depends on, to notice changed files.

  Covers the bytes of both text files and the size/mtime of the images.
  """
  paths = locate_files(manual_dir)
  digest = hashlib.sha256()
  for path in (paths.attributes, paths.partition):
    with open(path, 'rb') as f:
      digest.update(f.read())
  stat = os.stat(paths.images)
  digest.update(f'{paths.images}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
  return digest.hexdigest()[:16]


class CelebaFiles(tfds.core.GeneratorBasedBuilder):
  """CelebA aligned faces with their 40 attributes, from a manual folder."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Download img_align_celeba.zip, list_attr_celeba.txt and'
    ' list_eval_partition.txt from'
    ' https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or the Kaggle'
    ' "celeba-dataset") into one folder and pass it as manual_dir.'
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(218, 178, 3), encoding_format='jpeg'),
          'attributes': tfds.features.Tensor(shape=(len(CELEBA_ATTRIBUTES),), dtype=np.float32),
          'file_name': tfds.features.Text(),
        }
      ),
      homepage='https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html',
      disable_shuffling=True,  # Keep file order; the pipeline shuffles.
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    paths = locate_files(manual_dir)
    attributes = read_attributes(paths.attributes)
    partition = read_partition(paths.partition)
    unlabeled = [name for name in partition if name not in attributes]
    if unlabeled:
      raise UserError(
        f'{len(unlabeled)} images in {paths.partition} have no'
        f' line in {paths.attributes} (e.g. {unlabeled[0]}); use'
        ' matching files from the same download.'
      )
    members = _image_members(paths.images)
    missing = [name for name in partition if name not in members]
    if missing:
      raise UserError(
        f'{len(missing)} images listed in {paths.partition} are'
        f' missing from {paths.images} (e.g. {missing[0]}); put'
        ' the complete image set there.'
      )
    self.info.metadata['manual_fingerprint'] = manual_fingerprint(manual_dir)
    names = {split: [] for split in _SPLITS.values()}
    for name, split in partition.items():
      names[split].append(name)
    return {
      split: self._generate_examples(paths.images, members, files, attributes)
      for split, files in names.items()
      if files
    }

  def _generate_examples(self, images, members, files, attributes):
    for name, jpeg in _read_images(images, members, files):
      yield (
        name,
        {'image': jpeg, 'attributes': np.asarray(attributes[name], np.float32), 'file_name': name},
      )


def _read_images(images: str, members: dict[str, str], files: list[str]):
  """Yields (file name, JPEG bytes) from the zip or the folder, unchanged, each checked.

  Every image is decoded once here, so a damaged one stops the preparation
  with its name instead of failing (or hanging) inside training's decoder.
  """
  if images.endswith('.zip'):
    with _open_zip(images) as archive:
      for name in files:
        where = f'{members[name]} in {images}'
        try:
          data = archive.read(members[name])
        except (zipfile.BadZipFile, OSError) as e:  # CRC mismatch, truncated member.
          raise UserError(f'{where} cannot be read ({e}); re-download {images}') from None
        yield name, _checked_jpeg(data, where, images)
  else:
    for name in files:
      with open(members[name], 'rb') as f:
        yield name, _checked_jpeg(f.read(), members[name], members[name])


def _checked_jpeg(data: bytes, where: str, source: str) -> bytes:
  """`data` if it decodes completely as an image, else a UserError naming `where`."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
  except (OSError, SyntaxError, ValueError) as e:  # Truncated, or not an image at all.
    raise UserError(
      f'{where} is a damaged image ({e}); replace it (re-download {source}) and run again'
    ) from None
  return data


def _open_zip(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f'{path} is not a readable zip file ({e}); re-download it') from None


def _image_members(images: str) -> dict[str, str]:
  """Maps each JPEG's file name to its zip member or file path."""
  if images.endswith('.zip'):
    with _open_zip(images) as archive:
      return {os.path.basename(m): m for m in archive.namelist() if m.endswith('.jpg')}
  return {name: os.path.join(images, name) for name in os.listdir(images)}
