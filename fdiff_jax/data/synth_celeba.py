"""Writes a synthetic CelebA in the official file layout: drawn faces, CelebA-like labels.

It feeds the real `celeba_files` builder exactly like downloaded CelebA, so it
is both the test fixture and the offline face world. Each face has an
identity (head shape, skin tone, eyes, nose, mouth, hair style, clothes,
background, pose) drawn independently of its attributes, and 17 attributes
that visibly change their own region (`RENDERED_ATTRIBUTES`); the other 23
are written as -1.

Attribute statistics (`sample_attributes`) follow real CelebA's: the rates
below are rounded from the positive rates and co-occurrences of CelebA's
`list_attr_celeba.txt` (202,599 images; Liu et al., ICCV 2015), e.g. Male
0.42, Young 0.77, Smiling 0.48, Mouth_Slightly_Open 0.48, Wearing_Lipstick
0.47, Bangs 0.15, Eyeglasses 0.065, Wearing_Hat 0.048, Mustache 0.042,
Goatee 0.063, Pale_Skin 0.043, Gray_Hair 0.042, Bald 0.022. Two choices
differ from CelebA on purpose:
  * every face has exactly one of Black/Blond/Brown/Gray_Hair or Bald (in
    CelebA a third of the faces have none of them, e.g. red hair), so the
    three common colours are scaled up together, keeping their ratio
    (Black:Brown:Blond about 40:35:25) and their dependence on Male;
  * No_Beard means neither Mustache nor Goatee (CelebA also counts full
    beards and stubble, which are not drawn), so it is 0.92 rather than 0.84.
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

HAIR_COLOURS = ('Black_Hair', 'Blond_Hair', 'Brown_Hair', 'Gray_Hair')
RENDERED_ATTRIBUTES = (
  'Male',
  'Young',
  'Bald',
  *HAIR_COLOURS,
  'Bangs',
  'Mustache',
  'Goatee',
  'No_Beard',
  'Smiling',
  'Mouth_Slightly_Open',
  'Wearing_Lipstick',
  'Pale_Skin',
  'Eyeglasses',
  'Wearing_Hat',
)

_HAIR = {
  'Black_Hair': (28, 24, 24),
  'Blond_Hair': (236, 204, 110),
  'Brown_Hair': (112, 68, 36),
  'Gray_Hair': (178, 178, 182),
  None: (170, 70, 30),  # Red: drawn if no colour is given (never sampled).
}
_SKIN_DARK, _SKIN_LIGHT = np.array((96, 60, 40)), np.array((236, 192, 160))
_PALE = (250, 234, 226)
_LIPSTICK, _TEETH, _MOUTH = (196, 18, 48), (250, 250, 246), (70, 16, 24)
_FRAME = (16, 16, 20)
_IRIS = ((70, 40, 20), (40, 90, 160), (60, 110, 60), (120, 90, 40))
_HATS = ((30, 50, 150), (150, 30, 40), (40, 110, 60), (60, 60, 60), (200, 160, 60))
_CLOTHES = ((40, 60, 120), (140, 30, 40), (230, 230, 230), (40, 40, 40), (70, 120, 80))
_MALE_STYLES, _FEMALE_STYLES = ('crop', 'quiff', 'curly'), ('long', 'bob', 'waves', 'bun')


def _identity(seed) -> dict:
  """Everything about a face that its attributes do not decide, from `seed`."""
  rng = np.random.default_rng(seed)
  u = rng.random
  return dict(
    background=(rng.integers(40, 220, 3), rng.integers(40, 220, 3)),
    scale=0.92 + 0.16 * u(),
    cx=WIDTH / 2 + rng.uniform(-7, 7),
    cy=118 + rng.uniform(-6, 6),
    yaw=rng.uniform(-5, 5),  # features shift sideways: a slight head turn
    width=rng.uniform(0.9, 1.1),
    height=rng.uniform(0.92, 1.08),
    chin=rng.uniform(0.3, 0.6),  # chin width as a fraction of the face's
    tone=u(),  # 0 dark .. 1 light
    iris=_IRIS[rng.integers(len(_IRIS))],
    eye_gap=rng.uniform(19, 25),
    eye_size=rng.uniform(0.85, 1.15),
    nose=(rng.uniform(5, 10), rng.uniform(16, 26)),  # half width, length
    mouth=rng.uniform(13, 20),  # half width
    style=rng.integers(12),  # picks a style among those of the face's sex
    hat=_HATS[rng.integers(len(_HATS))],
    clothes=_CLOTHES[rng.integers(len(_CLOTHES))],
    glasses=rng.integers(2),  # round or square frames
  )


def luminance(rgb):
  """Luminance (ITU-R BT.601) of an RGB colour or of an [..., 3] image."""
  return np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])


def _beard_colour(hair, skin) -> tuple:
  """`hair` darkened to at least 80 below the skin's luminance (or to near black)."""
  target = max(luminance(skin) - 80, 14)
  k = min(1.0, target / max(luminance(hair), 1.0))
  return tuple(int(c * k) for c in hair)


def render_face(attributes: Mapping[str, bool], identity: int | Sequence[int]) -> np.ndarray:
  """Draws one 218x178x3 uint8 face; `identity` seeds all but the attributes.

  The same identity with one attribute flipped changes only that attribute's
  region, which is what the tests check. No_Beard is not drawn: it is the
  absence of Mustache and Goatee. Of the hair colours the first one set in
  `HAIR_COLOURS` is drawn; Bald draws no hair.
  """
  a = {name: bool(attributes.get(name, False)) for name in RENDERED_ATTRIBUTES}
  p = _identity(identity)
  s = p['scale']
  cx, cy = p['cx'], p['cy']
  fx = cx + p['yaw']  # where the features are centred
  rx, ry = 46 * s * p['width'], 58 * s * p['height']
  if a['Male']:
    rx *= 1.06
  hair_name = next((c for c in HAIR_COLOURS if a[c]), None)
  hair = None if a['Bald'] else _HAIR[hair_name]
  if a['Pale_Skin']:
    skin = _PALE
  else:
    skin = tuple(int(c) for c in _SKIN_DARK + p['tone'] * (_SKIN_LIGHT - _SKIN_DARK))
  shade = tuple(int(c * 0.7) for c in skin)
  ink = tuple(int(c * 0.45) for c in skin)

  image = Image.new('RGB', (WIDTH, HEIGHT))
  draw = ImageDraw.Draw(image)
  top, bottom = p['background']
  for y in range(HEIGHT):
    t = y / (HEIGHT - 1)
    draw.line((0, y, WIDTH, y), fill=tuple(int(c) for c in (1 - t) * top + t * bottom))

  styles = _MALE_STYLES if a['Male'] else _FEMALE_STYLES
  style = styles[p['style'] % len(styles)]
  if hair and style in ('long', 'waves', 'bob'):  # Hair behind the head.
    low = cy + (ry * 0.45 if style == 'bob' else ry + 52)
    draw.rounded_rectangle((cx - rx - 14, cy - ry - 12, cx + rx + 14, low), 26, hair)
    if style == 'waves':
      for side in (-1, 1):
        for k in range(4):
          x, y = cx + side * (rx + 10), cy - ry / 2 + k * 26
          draw.ellipse((x - 14, y, x + 14, y + 28), fill=hair)
  if hair and style == 'bun':
    draw.ellipse((cx - 20, cy - ry - 34, cx + 20, cy - ry + 2), fill=hair)

  # Neck and clothes.
  draw.rectangle((cx - rx * 0.42, cy + ry * 0.6, cx + rx * 0.42, cy + ry + 30), fill=shade)
  draw.chord((cx - rx - 40, cy + ry + 12, cx + rx + 40, cy + ry + 120), 180, 360, p['clothes'])

  # Head: a skull ellipse and a jaw down to a chin of identity-given width.
  draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry * 0.5), fill=skin)
  jaw = rx * (0.96 if a['Male'] else 0.88)
  chin = rx * p['chin'] * (1.25 if a['Male'] else 1.0)
  outline = (
    (cx - rx, cy - 4),
    (cx - jaw, cy + ry * 0.55),
    (cx - chin, cy + ry),
    (cx + chin, cy + ry),
    (cx + jaw, cy + ry * 0.55),
    (cx + rx, cy - 4),
  )
  draw.polygon(outline, fill=skin)
  for side in (-1, 1):  # Ears.
    draw.ellipse((cx + side * rx - 7, cy - 12, cx + side * rx + 7, cy + 14), fill=shade)

  eye_y = cy - 6 * s
  gap, size = p['eye_gap'] * s, p['eye_size']
  mouth_y, mw = cy + 36 * s, p['mouth']
  if not a['Young']:  # Forehead lines, bags and crow's feet (no folds near the mouth).
    for dy in (-44, -36, -28):
      draw.line((fx - 24, cy + dy * s, fx + 24, cy + dy * s), fill=ink, width=4)
    for side in (-1, 1):
      ex = fx + side * gap
      draw.arc((ex - 11, eye_y + 4, ex + 11, eye_y + 17), 20, 160, fill=ink, width=5)
      draw.line((ex + side * 11, eye_y - 4, ex + side * 17, eye_y - 8), fill=ink, width=3)
      draw.line((ex + side * 11, eye_y + 3, ex + side * 17, eye_y + 6), fill=ink, width=3)

  if hair:  # A cap of hair over the skull.
    draw.chord((cx - rx - 4, cy - ry - 8, cx + rx + 4, cy), 180, 360, hair)
    if style == 'quiff':
      draw.ellipse((cx - 34, cy - ry - 20, cx + 18, cy - ry + 14), fill=hair)
    elif style == 'curly':
      for k in range(-3, 4):
        x, y = cx + k * rx / 3.5, cy - ry + abs(k) * 6
        draw.ellipse((x - 12, y - 14, x + 12, y + 10), fill=hair)
  if a['Bangs'] and hair:  # A fringe over the forehead.
    draw.chord((cx - rx + 2, cy - ry - 2, cx + rx - 2, cy - ry * 0.2), 180, 360, hair)
    draw.rectangle((cx - rx * 0.82, cy - ry * 0.6, cx + rx * 0.82, eye_y - 10), fill=hair)

  brow = 5 if a['Male'] else 3
  for side in (-1, 1):
    ex = fx + side * gap
    draw.ellipse((ex - 9 * size, eye_y - 5 * size, ex + 9 * size, eye_y + 5 * size), (250,) * 3)
    draw.ellipse((ex - 4.5, eye_y - 4.5, ex + 4.5, eye_y + 4.5), fill=p['iris'])
    draw.ellipse((ex - 2, eye_y - 2, ex + 2, eye_y + 2), fill=(10, 10, 10))
    brow_colour = hair if hair and hair_name != 'Gray_Hair' else ink
    draw.line((ex - 11, eye_y - 13, ex + 11, eye_y - 14), fill=brow_colour, width=brow)
  nose_w, nose_l = p['nose']
  draw.polygon(
    ((fx, eye_y + 2), (fx - nose_w, eye_y + nose_l), (fx + nose_w, eye_y + nose_l)), shade
  )

  lips = (
    _LIPSTICK
    if a['Wearing_Lipstick']
    else tuple(int(c * 0.8) + 30 for c in skin[:1]) + tuple(int(c * 0.62) for c in skin[1:])
  )
  lip = 8 if a['Wearing_Lipstick'] else 5
  if a['Smiling'] and a['Mouth_Slightly_Open']:  # Open smile with teeth.
    draw.chord((fx - mw - 7, mouth_y - 14, fx + mw + 7, mouth_y + 19), 0, 180, fill=lips)
    draw.chord((fx - mw - 1, mouth_y - 7, fx + mw + 1, mouth_y + 13), 0, 180, fill=_MOUTH)
    draw.rectangle((fx - mw + 4, mouth_y + 1, fx + mw - 4, mouth_y + 6), fill=_TEETH)
  elif a['Smiling']:  # Closed smile: a wide curve up to the corners, lips parted by a dark line.
    draw.arc((fx - mw - 9, mouth_y - 20, fx + mw + 9, mouth_y + 10), 12, 168, lips, lip + 6)
    draw.arc((fx - mw - 6, mouth_y - 17, fx + mw + 6, mouth_y + 6), 15, 165, _MOUTH, 4)
  elif a['Mouth_Slightly_Open']:  # Parted lips round a dark opening.
    draw.ellipse((fx - mw + 1, mouth_y - 7 - lip / 2, fx + mw - 1, mouth_y + 7 + lip / 2), lips)
    draw.ellipse((fx - mw + 6, mouth_y - 5, fx + mw - 6, mouth_y + 5), fill=_MOUTH)
  else:
    draw.line((fx - mw, mouth_y, fx + mw, mouth_y), fill=lips, width=lip + 1)

  # Facial hair in the hair's colour, darkened until it stands out from the skin.
  beard = _beard_colour(
    _HAIR[hair_name] if hair_name and not a['Bald'] else _HAIR['Brown_Hair'], skin
  )
  if a['Mustache']:
    draw.rounded_rectangle((fx - mw - 9, mouth_y - 21, fx + mw + 9, mouth_y - 7), 5, beard)
  if a['Goatee']:
    draw.rounded_rectangle((fx - 17, mouth_y + 10, fx + 17, cy + ry + 2), 8, beard)
  if a['Eyeglasses']:
    for side in (-1, 1):
      ex = fx + side * gap
      box = (ex - 15, eye_y - 12, ex + 15, eye_y + 12)
      if p['glasses']:
        draw.rectangle(box, outline=_FRAME, width=5)
      else:
        draw.ellipse(box, outline=_FRAME, width=5)
    draw.line((fx - gap + 15, eye_y - 2, fx + gap - 15, eye_y - 2), fill=_FRAME, width=5)
  if a['Wearing_Hat']:  # Crown and brim over the top of the head.
    brim = cy - ry * 0.62
    draw.rounded_rectangle((cx - rx * 0.9, brim - 52, cx + rx * 0.9, brim), 10, p['hat'])
    draw.rectangle((cx - rx - 20, brim - 8, cx + rx + 20, brim + 4), fill=p['hat'])
  return np.asarray(image)


def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
  """Samples one CelebA-like attribute combination (rates in the module docstring)."""
  r = rng.random
  male = r() < 0.42
  young = r() < (0.65 if male else 0.86)
  bald = male and r() < (0.02 if young else 0.12)
  gray = not bald and r() < (0.005 if young else 0.17)
  colour = 'Gray_Hair' if gray else None
  if not bald and not gray:  # Black:Brown:Blond given sex, about 40:35:25 overall.
    weights = (0.48, 0.12, 0.40) if male else (0.33, 0.32, 0.35)
    colour = HAIR_COLOURS[rng.choice(3, p=weights)]
  mustache = male and r() < 0.10
  goatee = male and r() < (0.5 if mustache else 0.10)
  smiling = r() < 0.48
  eyeglasses = r() < {(1, 1): 0.07, (1, 0): 0.20, (0, 1): 0.02, (0, 0): 0.07}[(male, young)]
  a = dict(
    Male=male,
    Young=young,
    Bald=bald,
    **{c: c == colour for c in HAIR_COLOURS},
    Bangs=not bald and r() < (0.06 if male else 0.22),
    Mustache=mustache,
    Goatee=goatee,
    No_Beard=not (mustache or goatee),
    Smiling=smiling,
    Mouth_Slightly_Open=r() < (0.70 if smiling else 0.27),
    Wearing_Lipstick=r() < (0.005 if male else 0.80),
    Pale_Skin=r() < (0.012 if male else 0.065),
    Eyeglasses=eyeglasses,
    Wearing_Hat=r() < (0.06 if male else 0.04),
  )
  return a


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
