"""The FID Inception port: architecture, the safe .pth reader, weight loading, determinism."""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import jax
import numpy as np
import pytest

from fdiff_jax.errors import UserError
from fdiff_jax.metrics import inception, torch_state_dict


def test_architecture_matches_inception_v3_without_aux_and_fc():
  variables = inception.abstract_variables()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  assert params == 21_785_568  # torchvision inception_v3 (27,161,264) minus AuxLogits and fc.
  assert variables['params']['Mixed_7c']['branch_pool']['conv']['kernel'].shape == (1, 1, 2048, 192)
  assert variables['params']['Mixed_5b']['branch_pool']['conv']['kernel'].shape == (1, 1, 192, 32)


def random_state_dict():
  """Random weights under pytorch-fid's names and PyTorch layouts, plus unused extras."""
  rng = np.random.default_rng(0)
  out = collections.OrderedDict()
  for path, leaf in jax.tree_util.tree_leaves_with_path(inception.abstract_variables()):
    collection, *rest = [k.key for k in path]
    shape = leaf.shape if len(leaf.shape) != 4 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
    if rest[-1] in ('var', 'scale'):
      value = rng.uniform(0.5, 1.5, shape)
    elif rest[-1] == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))  # He: keeps the scale.
    else:
      value = rng.normal(size=shape) * 0.1
    out[inception.torch_name(collection, rest)] = value.astype(np.float32)
  out['fc.weight'] = rng.normal(size=(1008, 2048)).astype(np.float32)
  out['Conv2d_1a_3x3.bn.num_batches_tracked'] = np.array(0, np.int64)
  return out


def cross_check_images():
  """Three non-square images in [-1, 1]: the input of the pytorch-fid cross-check."""
  return np.random.default_rng(1).uniform(-1, 1, (3, 48, 40, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def state_dict():
  return random_state_dict()


class _FakeTorch:
  """Just enough of `torch` for the standard pickler to write a real .pth: storages + rebuild."""

  def __init__(self, monkeypatch):
    torch_module, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')
    for name in ('FloatStorage', 'LongStorage'):
      setattr(torch_module, name, type(name, (), {'__module__': 'torch'}))

    def _rebuild_tensor_v2(*args):
      raise AssertionError('only used for pickling')

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = (
      'torch._utils',
      '_rebuild_tensor_v2',
    )
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_module._utils = utils
    monkeypatch.setitem(sys.modules, 'torch', torch_module)
    monkeypatch.setitem(sys.modules, 'torch._utils', utils)
    self.module = torch_module


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class Crafted:
  """A tensor entry with the rebuild arguments given as they are, as a crafted file may hold."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return sys.modules['torch._utils']._rebuild_tensor_v2, self.args


def storage(key, array):
  """A storage to hand to `Crafted`; `write_pth` writes its bytes."""
  return _Storage(key, np.ascontiguousarray(array))


def _pickle_state_dict(state_dict, torch_module, legacy):
  """The state dict pickled as torch does: tensors by reference to storages."""
  storages = {}
  tensors = collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    if not isinstance(value, Crafted):
      strides = tuple(int(s) for s in np.cumprod((1,) + value.shape[::-1])[:-1][::-1])
      value = Crafted(storage(str(i), value), 0, value.shape, strides)
    tensors[name] = value

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if not isinstance(obj, _Storage):
        return None
      storages[obj.key] = obj
      kind = torch_module.LongStorage if obj.array.dtype == np.int64 else torch_module.FloatStorage
      pid = ('storage', kind, obj.key, 'cpu', obj.array.size)
      return pid + (None,) if legacy else pid

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(tensors)
  return buffer.getvalue(), storages


def write_pth(path, state_dict, monkeypatch, legacy=False):
  """Writes `state_dict` in PyTorch's zip (>= 1.6) or legacy .pth format, without torch.

  Its values are arrays, or `Crafted` entries written exactly as given.
  """
  with monkeypatch.context() as m:
    data, storages = _pickle_state_dict(state_dict, _FakeTorch(m).module, legacy)
  if not legacy:
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', data)
      archive.writestr('archive/version', '3\n')
      for key, storage in storages.items():
        archive.writestr(f'archive/data/{key}', storage.array.tobytes())
    return
  with open(path, 'wb') as f:
    for header in (torch_state_dict.LEGACY_MAGIC, 1001, {'little_endian': True}):
      pickle.dump(header, f, protocol=2)
    f.write(data)
    pickle.dump(list(storages), f, protocol=2)
    for storage in storages.values():
      f.write(struct.pack('<q', storage.array.size) + storage.array.tobytes())


@pytest.mark.parametrize('legacy', [False, True])
def test_safe_reader_reads_both_pth_formats(state_dict, tmp_path, monkeypatch, legacy):
  path = str(tmp_path / 'weights.pth')
  write_pth(path, state_dict, monkeypatch, legacy=legacy)
  loaded = torch_state_dict.load_state_dict(path)
  assert list(loaded) == list(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(loaded[name], value)


def test_reader_refuses_code_and_never_runs_it(tmp_path):
  marker = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return os.system, (f'touch {marker}',)

  path = str(tmp_path / 'evil.pth')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'x': Exploit()}, protocol=2))
  with pytest.raises(UserError, match='refusing to load'):
    inception.load_variables(path)
  assert not marker.exists()


@pytest.fixture(scope='module')
def pth_variables(state_dict, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('weights') / 'pt_inception.pth')
  with pytest.MonkeyPatch.context() as m:
    write_pth(path, state_dict, m)
  return inception.load_variables(path)


def test_loaded_weights_are_placed_in_flax_layout(state_dict, pth_variables):
  kernel = np.asarray(pth_variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel'])
  np.testing.assert_array_equal(
    kernel, state_dict['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0)
  )
  assert kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(
    pth_variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
    state_dict['Mixed_7c.branch_pool.bn.running_var'],
  )


def test_npz_weights_load_identically(state_dict, pth_variables, tmp_path):
  path = str(tmp_path / 'weights.npz')
  np.savez(path, **state_dict)
  for a, b in zip(jax.tree.leaves(inception.load_variables(path)), jax.tree.leaves(pth_variables)):
    np.testing.assert_array_equal(a, b)


def test_features_shape_and_determinism(pth_variables):
  features = inception.make_feature_fn(pth_variables)
  rng = np.random.default_rng(1)
  rgb = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  first, second = np.asarray(features(rgb)), np.asarray(features(rgb))
  assert first.shape == (2, inception.FEATURES) and np.isfinite(first).all()
  np.testing.assert_array_equal(first, second)
  assert np.abs(first[0] - first[1]).max() > 1e-3 * np.abs(first).max()  # Not a constant output.
  gray = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(features(gray)), np.asarray(features(np.repeat(gray, 3, -1))), rtol=1e-5, atol=1e-6
  )


def test_features_equal_pytorch_fid_on_the_same_weights(state_dict):
  """pytorch-fid's FIDInceptionV3 itself, run once on these random weights and images (see
  tests/data/make_pytorch_fid_reference.py), gave the reference: every layer, pool quirk,
  the resize and the input scaling must agree for the features to match."""
  reference = np.load(os.path.join(os.path.dirname(__file__), 'data', 'pytorch_fid_features.npy'))
  features = inception.make_feature_fn(inception.variables_from_state_dict(state_dict))
  ours = np.asarray(features(cross_check_images()))
  assert ours.shape == reference.shape == (3, inception.FEATURES)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_wrong_or_missing_weights_are_clear_errors(state_dict, tmp_path):
  partial = dict(state_dict)
  del partial['Mixed_6e.branch_pool.conv.weight']
  np.savez(tmp_path / 'partial.npz', **partial)
  with pytest.raises(UserError, match='Mixed_6e.branch_pool.conv.weight'):
    inception.load_variables(str(tmp_path / 'partial.npz'))
  with pytest.raises(UserError, match='--inception-weights'):
    inception.load_variables(str(tmp_path / 'nope.pth'))


def test_download_is_checksummed_and_cached_once(tmp_path, monkeypatch):
  source = tmp_path / 'published.pth'
  source.write_bytes(b'pretend weights')
  monkeypatch.setattr(inception, 'WEIGHTS_URL', source.as_uri())
  with pytest.raises(UserError, match='sha256'):  # The real checksum: these bytes do not match it.
    inception.cached_weights(str(tmp_path / 'cache'))
  assert not os.listdir(tmp_path / 'cache')  # A mismatching download is not kept.
  monkeypatch.setattr(inception, 'WEIGHTS_SHA256', inception.sha256(str(source)))
  path = inception.cached_weights(str(tmp_path / 'cache'))
  assert open(path, 'rb').read() == b'pretend weights'
  source.unlink()  # Cached: the second call downloads nothing.
  assert inception.cached_weights(str(tmp_path / 'cache')) == path


def test_offline_download_failure_says_how_to_get_the_weights(tmp_path, monkeypatch):
  monkeypatch.setattr(inception, 'WEIGHTS_URL', (tmp_path / 'absent.pth').as_uri())
  with pytest.raises(UserError) as error:
    inception.cached_weights(str(tmp_path / 'cache'))
  assert '--inception-weights' in str(error.value) and inception.WEIGHTS_SHA256 in str(error.value)
  assert not os.listdir(tmp_path / 'cache')  # No partial download left behind.
