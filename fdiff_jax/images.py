"""Image file boundaries: [-1, 1] float arrays <-> uint8, grids, PNG and GIF."""

import io
import os

import numpy as np
from etils import epath
from PIL import Image

from fdiff_jax.errors import UserError


def to_uint8(images):
  """[-1, 1] float -> uint8, rounding to nearest."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, rows, pad=2):
  """[N, H, W, C] uint8 (N = rows * cols) -> one [H', W', C] image with padding."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = img
  return grid


def _pil(image):
  image = np.asarray(image)
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_atomically(path, save):
  """Writes `path` (local or e.g. gs://) via save(file) to a temporary sibling, then renames.

  Never leaves a half-written file behind.
  """
  buffer = io.BytesIO()
  save(buffer)
  target = epath.Path(path)
  tmp = target.parent / (target.name + '.tmp')
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(target)
  except OSError as e:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise UserError(f'cannot write {path} ({e.strerror or e}); choose another path') from None


def check_writable(path, what, folder=False):
  """Raises a UserError, before any work, if `path` (a file, or a `folder`) cannot be written.

  Refuses a file path that is a folder, a folder path that is a file, a parent
  that is a file, and a place without write permission. URLs are not checked.
  """
  if not path or '://' in str(path):
    return
  path = os.path.abspath(path)
  if os.path.isdir(path) and not folder:
    raise UserError(f'{what} {path} is a folder; give a file name inside it')
  if os.path.exists(path) and folder and not os.path.isdir(path):
    raise UserError(f'{what} {path} is a file; give a folder')
  existing = path if folder and os.path.isdir(path) else os.path.dirname(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'{what} {path} is under {existing}, which is a file; choose another path')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'{what} {path}: no permission to write in {existing}; choose another path')


def _scaled(image, scale):
  img = _pil(image)
  return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_png(path, image, scale=1):
  """Writes an HWC uint8 image; `scale` enlarges small images (nearest)."""
  write_atomically(path, lambda f: _scaled(image, scale).save(f, format='PNG'))


def save_gif(path, frames, duration_ms=120, scale=1):
  imgs = [_scaled(f, scale) for f in frames]
  write_atomically(
    path,
    lambda f: imgs[0].save(
      f, format='GIF', save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0
    ),
  )


def grid_image(images):
  """[rows, cols, H, W, C] in [-1, 1] -> one uint8 grid image with a row per leading index."""
  images = np.asarray(images)
  return make_grid(to_uint8(images.reshape((-1,) + images.shape[2:])), images.shape[0])


def animation_frames(rows):
  """[rows, frames, H, W, C] in [-1, 1] -> one uint8 column image (a frame of every row) per frame."""
  rows = np.asarray(rows)
  return [grid_image(rows[:, f : f + 1]) for f in range(rows.shape[1])]


def save_each(out_dir, images, prefix, scale=1):
  """Writes [N, H, W, C] images in [-1, 1] as out_dir/{prefix}_0000.png, ... (in order)."""
  for i, image in enumerate(to_uint8(images)):
    save_png(os.path.join(out_dir, f'{prefix}_{i:04d}.png'), image, scale)
