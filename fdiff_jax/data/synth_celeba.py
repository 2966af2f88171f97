"""Writes a synthetic CelebA of cartoon faces in the official file layout.

It feeds the real `celeba_files` builder exactly like downloaded CelebA, so it
is both the test fixture and the offline face demo. Ten attributes, sampled
independently, visibly change the pixels (`RENDERED_ATTRIBUTES`); the other 30
are written as -1.
"""

import io
import os
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES
from fdiff_jax.errors import UserError

HEIGHT, WIDTH = 218, 178  # The size of CelebA's aligned images.

RENDERED_ATTRIBUTES = (
  'Male',
  'Smiling',
  'Eyeglasses',
  'Black_Hair',
  'Blond_Hair',
  'Pale_Skin',
  'Wearing_Hat',
  'Mustache',
  'Bangs',
  'Young',
)

# Probability of +1 per rendered attribute; hair colours are rarer so that
# "both" (drawn two-tone) stays uncommon.
_PROBABILITY = {name: 0.5 for name in RENDERED_ATTRIBUTES}
_PROBABILITY.update(Black_Hair=0.3, Blond_Hair=0.3, Mustache=0.3)

_BLACK, _BLOND, _BROWN = (30, 25, 25), (240, 210, 110), (125, 80, 40)
_HAT, _FRAME, _INK = (40, 60, 170), (10, 10, 10), (60, 30, 25)


def render_face(attributes: Mapping[str, bool], identity: int | Sequence[int]) -> np.ndarray:
  """Draws one 218x178x3 uint8 face; `identity` seeds all but the attributes.

  The same identity with one attribute flipped changes only that attribute's
  pixels, which is what the tests check.
  """
  a = {name: bool(attributes.get(name, False)) for name in RENDERED_ATTRIBUTES}
  rng = np.random.default_rng(identity)
  background = tuple(int(c) for c in rng.integers(90, 200, 3))
  cx = WIDTH // 2 + int(rng.integers(-4, 5))
  cy = 125 + int(rng.integers(-4, 5))
  rx, ry = 48 + int(rng.integers(-4, 5)), 60 + int(rng.integers(-4, 5))
  tone = int(rng.integers(-12, 13))
  skin = (248, 228, 218) if a['Pale_Skin'] else (200 + tone, 150 + tone, 110)
  image = Image.new('RGB', (WIDTH, HEIGHT), background)
  draw = ImageDraw.Draw(image)

  hair_box = (cx - rx - 14, cy - ry - 18, cx + rx + 14, cy + ry + 40)
  if a['Male']:  # Short hair: a cap over the skull only.
    hair_box = (cx - rx - 8, cy - ry - 14, cx + rx + 8, cy + 10)
  _draw_hair(draw, hair_box, a['Black_Hair'], a['Blond_Hair'], cx)
  jaw = 10 if a['Male'] else 0  # Male faces get a wider jaw.
  draw.ellipse((cx - rx - jaw // 2, cy - ry, cx + rx + jaw // 2, cy + ry), fill=skin)

  eye_y, eye_dx = cy - 8, 21 + int(rng.integers(-2, 3))
  for side in (-1, 1):
    ex = cx + side * eye_dx
    draw.ellipse((ex - 8, eye_y - 5, ex + 8, eye_y + 5), fill=(255, 255, 255))
    draw.ellipse((ex - 4, eye_y - 4, ex + 4, eye_y + 4), fill=(40, 30, 30))
    draw.line((ex - 10, eye_y - 13, ex + 10, eye_y - 13), fill=_INK, width=3)
  draw.polygon(
    ((cx, eye_y + 4), (cx - 6, cy + 18), (cx + 6, cy + 18)),
    fill=tuple(max(c - 35, 0) for c in skin),
  )

  mouth_y = cy + 36
  if a['Smiling']:  # Open smile with teeth.
    draw.chord((cx - 24, mouth_y - 14, cx + 24, mouth_y + 16), 0, 180, fill=(150, 20, 30))
    draw.rectangle((cx - 16, mouth_y + 1, cx + 16, mouth_y + 5), fill=(255, 255, 255))
  else:
    draw.line((cx - 16, mouth_y + 2, cx + 16, mouth_y + 2), fill=(150, 40, 50), width=5)
  if a['Mustache']:
    draw.rounded_rectangle((cx - 26, mouth_y - 16, cx + 26, mouth_y - 5), radius=5, fill=_INK)
  if not a['Young']:  # Wrinkles: forehead, under the eyes, nose to mouth.
    for dy in (-44, -34):
      draw.line((cx - 26, cy + dy, cx + 26, cy + dy), fill=_INK, width=4)
    for side in (-1, 1):
      ex = cx + side * eye_dx
      draw.arc((ex - 12, eye_y + 6, ex + 12, eye_y + 22), 20, 160, fill=_INK, width=4)
      draw.line((cx + side * 14, cy + 12, cx + side * 30, cy + 34), fill=_INK, width=4)
  if a['Bangs']:  # A fringe of hair over the forehead.
    fringe = (cx - rx + 4, cy - ry - 6, cx + rx - 4, eye_y - 18)
    _draw_hair(draw, fringe, a['Black_Hair'], a['Blond_Hair'], cx)
  if a['Eyeglasses']:  # Big round frames and a bridge.
    for side in (-1, 1):
      ex = cx + side * eye_dx
      draw.ellipse((ex - 16, eye_y - 14, ex + 16, eye_y + 14), outline=_FRAME, width=5)
    draw.line((cx - eye_dx + 16, eye_y, cx + eye_dx - 16, eye_y), fill=_FRAME, width=5)
  if a['Wearing_Hat']:  # Crown and brim above the forehead.
    brim_y = cy - ry + 8
    draw.rectangle((cx - rx + 6, brim_y - 50, cx + rx - 6, brim_y - 6), fill=_HAT)
    draw.rectangle((cx - rx - 22, brim_y - 10, cx + rx + 22, brim_y + 2), fill=_HAT)
  return np.asarray(image)


def _draw_hair(draw, box, black: bool, blond: bool, cx: int):
  """Fills `box` with hair: black, blond, two-tone if both, else brown."""
  left = _BLACK if black else _BLOND if blond else _BROWN
  right = _BLOND if blond else left
  draw.rounded_rectangle(box, radius=30, fill=left)
  if right != left:
    draw.rounded_rectangle((cx, box[1], box[2], box[3]), radius=30, fill=right)


def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
  """Samples each rendered attribute independently."""
  return {name: bool(rng.random() < _PROBABILITY[name]) for name in RENDERED_ATTRIBUTES}


def write_synthetic_celeba(out_dir: str, num: int, seed: int = 0, layout: str = 'official') -> None:
  """Writes `num` faces plus attribute and partition files into `out_dir`.

  layout='official': `img_align_celeba.zip` (entries
  `img_align_celeba/000001.jpg`, ...), `list_attr_celeba.txt`,
  `list_eval_partition.txt`. layout='kaggle': `list_attr_celeba.csv`,
  `list_eval_partition.csv` and JPEGs in `img_align_celeba/img_align_celeba/`.
  The first ~80% are train, then ~10% validation, the rest test (at least one
  each), as contiguous ranges like the official partition.
  """
  if layout not in ('official', 'kaggle'):
    raise UserError(f"unknown layout '{layout}'; use 'official' or 'kaggle'.")
  if num < 3:
    raise UserError(f'num={num} is too small; write at least 3 images (one per split).')
  os.makedirs(out_dir, exist_ok=True)
  names = [f'{i:06d}.jpg' for i in range(1, num + 1)]
  rows, partitions = [], []
  num_eval = max(1, num // 10)
  images = {}
  for i, name in enumerate(names):
    rng = np.random.default_rng([seed, i])
    present = sample_attributes(rng)
    buffer = io.BytesIO()
    Image.fromarray(render_face(present, [seed, i, 1])).save(buffer, format='JPEG', quality=95)
    images[name] = buffer.getvalue()
    rows.append([1 if present.get(a) else -1 for a in CELEBA_ATTRIBUTES])
    partitions.append(0 if i < num - 2 * num_eval else 1 if i < num - num_eval else 2)
  if layout == 'official':
    _write_official(out_dir, names, rows, partitions, images)
  else:
    _write_kaggle(out_dir, names, rows, partitions, images)


_ZIP_DATE_TIME = (2015, 1, 1, 0, 0, 0)  # CelebA's release year


def _write_official(out_dir, names, rows, partitions, images):
  """Writes the files as CelebA's Google Drive distributes them."""
  with zipfile.ZipFile(
    os.path.join(out_dir, 'img_align_celeba.zip'), 'w', zipfile.ZIP_STORED
  ) as archive:
    for name in names:
      # A fixed timestamp: the same seed gives byte-identical archives.
      entry = zipfile.ZipInfo(f'img_align_celeba/{name}', _ZIP_DATE_TIME)
      entry.external_attr = 0o644 << 16
      archive.writestr(entry, images[name])
  with open(os.path.join(out_dir, 'list_attr_celeba.txt'), 'w') as f:
    f.write(f'{len(names)}\n' + ' '.join(CELEBA_ATTRIBUTES) + ' \n')
    for name, row in zip(names, rows):
      f.write(f'{name} ' + ' '.join(f'{v:2d}' for v in row) + '\n')
  with open(os.path.join(out_dir, 'list_eval_partition.txt'), 'w') as f:
    f.writelines(f'{name} {p}\n' for name, p in zip(names, partitions))


def _write_kaggle(out_dir, names, rows, partitions, images):
  """Writes the files as the popular Kaggle CelebA dataset lays them out."""
  folder = os.path.join(out_dir, 'img_align_celeba', 'img_align_celeba')
  os.makedirs(folder, exist_ok=True)
  for name in names:
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(images[name])
  with open(os.path.join(out_dir, 'list_attr_celeba.csv'), 'w') as f:
    f.write('image_id,' + ','.join(CELEBA_ATTRIBUTES) + '\n')
    for name, row in zip(names, rows):
      f.write(name + ',' + ','.join(str(v) for v in row) + '\n')
  with open(os.path.join(out_dir, 'list_eval_partition.csv'), 'w') as f:
    f.write('image_id,partition\n')
    f.writelines(f'{name},{p}\n' for name, p in zip(names, partitions))
