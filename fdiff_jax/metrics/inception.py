"""The FID Inception-v3 in Flax: 2048-d pool features comparable with published FIDs.

A port of pytorch-fid's `FIDInceptionV3`, itself a port of TensorFlow's
`inception-2015-12-05` graph that the original FID code (TTUR) uses: its
average pools exclude padding, the last block max-pools, images are resized
bilinearly (no antialiasing) to 299x299 and scaled to [-1, 1]. Module names
equal the PyTorch state-dict names, so pytorch-fid's published weights
(`pt_inception-2015-12-05-6726825d.pth`) load directly.
"""

import functools
import hashlib
import os
import shutil
import urllib.request
import zipfile
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdiff_jax.errors import UserError
from fdiff_jax.metrics import torch_state_dict

# What a damaged .npz (a zip) raises besides ValueError and OSError.
DAMAGED_ZIP = (zipfile.BadZipFile, zlib.error, EOFError)

WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
  'pt_inception-2015-12-05-6726825d.pth'
)
WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)
INPUT_SIZE = 299
FEATURES = 2048


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      use_bias=False,
      padding=tuple((p, p) for p in self.padding),
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool(x):
  """3x3 stride-1 average pool, padding excluded from the mean (TF's FID graph)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c, name='branch7x7_1')(x)
    b7 = BasicConv(c, **row, name='branch7x7_2')(b7)
    b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = BasicConv(c, name='branch7x7dbl_1')(x)
    bd = BasicConv(c, **col, name='branch7x7dbl_2')(bd)
    bd = BasicConv(c, **row, name='branch7x7dbl_3')(bd)
    bd = BasicConv(c, **col, name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool) and Mixed_7c (max pool: a quirk of the TF graph)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    def split(y, prefix):  # Parallel 1x3 and 3x1 convolutions, concatenated.
      return jnp.concatenate(
        [
          BasicConv(384, (1, 3), padding=(0, 1), name=f'{prefix}a')(y),
          BasicConv(384, (3, 1), padding=(1, 0), name=f'{prefix}b')(y),
        ],
        -1,
      )

    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = split(BasicConv(384, name='branch3x3_1')(x), 'branch3x3_2')
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = split(BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd), 'branch3x3dbl_3')
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """[B, H, W, C] images in [-1, 1] (C = 1 or 3, any size) -> [B, 2048] pool features."""

  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    size = (x.shape[0], self.input_size, self.input_size, 3)
    x = jax.image.resize(x, size, 'bilinear', antialias=False)
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool(x)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_variables(model=None):
  """Shapes of the model's {'params', 'batch_stats'}, without computing them."""
  model = model or FIDInceptionV3()
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))


def torch_name(collection, path):
  """Flax variable path -> its name in pytorch-fid's state dict."""
  *modules, leaf = path
  leaf = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
  }[(collection, leaf)]
  return '.'.join([*modules, leaf])


def variables_from_state_dict(state_dict, source='state dict'):
  """pytorch-fid's {name: array} -> Flax variables, checking every name and shape."""

  def convert(path, leaf):
    collection, *rest = [k.key for k in path]
    name = torch_name(collection, rest)
    if name not in state_dict:
      raise UserError(f'{source} has no {name!r}: not the pytorch-fid FID Inception weights')
    value = np.asarray(state_dict[name], np.float32)
    value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
    if value.shape != leaf.shape:
      raise UserError(f'{source}: {name!r} has shape {value.shape}, expected {leaf.shape}')
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(convert, abstract_variables())


def load_variables(path):
  """Flax variables from pytorch-fid's `.pth` (read without unpickling code) or an `.npz`."""
  if not os.path.isfile(path):
    raise UserError(f'Inception weights {path!r} not found; {how_to_get_weights()}')
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as f:
        state_dict = dict(f)
    else:
      state_dict = torch_state_dict.load_state_dict(path)
  except DAMAGED_ZIP as e:
    raise UserError(
      f'cannot read Inception weights {path!r}: the file is damaged ({type(e).__name__}: {e}); '
      'make or download it again'
    ) from None
  except (ValueError, OSError, torch_state_dict.UnsafeWeightsError) as e:
    raise UserError(f'cannot read Inception weights {path!r}: {e}') from None
  return variables_from_state_dict(state_dict, path)


def how_to_get_weights(cache_dir=None):
  """One line telling the user where the weights come from and where to put them."""
  target = os.path.join(cache_dir or default_cache_dir(), WEIGHTS_FILE)
  return (
    f'download {WEIGHTS_URL} (sha256 {WEIGHTS_SHA256}) and pass --inception-weights PATH, '
    f'or put it at {target}'
  )


def default_cache_dir():
  """$FDIFF_CACHE, else $XDG_CACHE_HOME/fdiff_jax, else ~/.cache/fdiff_jax."""
  return os.environ.get('FDIFF_CACHE') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'fdiff_jax'
  )


def sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def cached_weights(cache_dir=None, timeout=60):
  """Path of the checksummed weights in the cache, downloading them once.

  Raises UserError (saying how to get the weights by hand) when offline or
  when the download does not match WEIGHTS_SHA256.
  """
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, WEIGHTS_FILE)
  if os.path.isfile(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{path}.{os.getpid()}.download'
  try:
    with urllib.request.urlopen(WEIGHTS_URL, timeout=timeout) as response, open(tmp, 'wb') as f:
      shutil.copyfileobj(response, f)
    digest = sha256(tmp)
    if digest != WEIGHTS_SHA256:
      raise UserError(
        f'downloaded Inception weights have sha256 {digest}, expected '
        f'{WEIGHTS_SHA256}; {how_to_get_weights(cache_dir)}'
      )
    os.replace(tmp, path)
  except OSError as e:  # URLError, timeouts, disk errors.
    raise UserError(
      f'cannot download the Inception weights ({e}); {how_to_get_weights(cache_dir)}'
    ) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def make_feature_fn(variables, model=None):
  """Returns jitted fn(images [B, H, W, C] in [-1, 1]) -> [B, 2048] float32 features."""
  model = model or FIDInceptionV3()
  return jax.jit(functools.partial(model.apply, variables))
