"""Reads a PyTorch `.pth` state dict into numpy without torch and without running its code.

A `.pth` file is a pickle, and unpickling can execute arbitrary code. This
reader allows only the handful of globals a plain tensor state dict needs
(OrderedDict, the tensor rebuild functions, storage types) and refuses
everything else. Both torch's zip format (>= 1.6: `archive/data.pkl` plus one
raw file per storage) and the older legacy format (pickles followed by the
raw storages) are read.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
  'FloatStorage': np.float32,
  'DoubleStorage': np.float64,
  'HalfStorage': np.float16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}


class UnsafeWeightsError(Exception):
  """The file asks to run something other than the tensor rebuild functions."""


class _LazyTensor:
  """A tensor whose storage bytes may come later in the file (legacy format)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self, storages):
    """A numpy copy of the strided view into storages[key]."""
    key, dtype = self.storage
    flat = storages[key]
    if not self.size:
      return flat[self.offset].copy()
    return np.array(
      np.lib.stride_tricks.as_strided(
        flat[self.offset :], shape=self.size, strides=tuple(s * dtype.itemsize for s in self.stride)
      )
    )


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


class _StorageType:
  """Stands in for torch.FloatStorage & co.: just the element dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


_ALLOWED = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  **{('torch', name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; records the (key, dtype) of every storage."""

  def __init__(self, file):
    super().__init__(file)
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise UnsafeWeightsError(f'refusing to load {module}.{name}: not a plain tensor state dict')
    return _ALLOWED[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise UnsafeWeightsError(f'unexpected persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise UnsafeWeightsError(f'unexpected storage type {storage_type!r}')
    self.storages[key] = storage_type.dtype
    return key, storage_type.dtype


def _read_zip(path):
  with zipfile.ZipFile(path) as archive:
    pickle_name = next((n for n in archive.namelist() if n.rpartition('/')[2] == 'data.pkl'), None)
    if pickle_name is None:
      raise ValueError(f'{path} is a zip file without data.pkl, not a torch checkpoint')
    prefix = pickle_name[: -len('data.pkl')]
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickle_name)))
    result = unpickler.load()
    storages = {
      key: np.frombuffer(archive.read(f'{prefix}data/{key}'), dtype)
      for key, dtype in unpickler.storages.items()
    }
  return result, storages


def _read_legacy(path):
  """torch < 1.6: magic, protocol, sys info, the state dict, storage keys, raw storages."""
  with open(path, 'rb') as f:
    try:
      magic = _RestrictedUnpickler(f).load()
    except UnsafeWeightsError:
      raise
    except Exception:  # pylint: disable=broad-except  # Not a pickle at all.
      magic = None
    if magic != LEGACY_MAGIC:
      raise ValueError(f'{path} is not a PyTorch checkpoint (neither zip nor legacy format)')
    for _ in range(2):  # Protocol version, then system info: plain values.
      _RestrictedUnpickler(f).load()
    unpickler = _RestrictedUnpickler(f)
    result = unpickler.load()
    storages = {}
    for key in _RestrictedUnpickler(f).load():
      dtype = unpickler.storages[str(key)]
      (numel,) = struct.unpack('<q', f.read(8))
      storages[str(key)] = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
  return result, storages


def load_state_dict(path):
  """{name: np.ndarray} of a torch state dict file, never executing code from it."""
  result, storages = (_read_zip if zipfile.is_zipfile(path) else _read_legacy)(path)
  if not isinstance(result, dict):
    raise ValueError(f'{path} holds a {type(result).__name__}, not a state dict')
  arrays = {}
  for name, value in result.items():
    if not isinstance(value, _LazyTensor):
      raise ValueError(f'{path}: entry {name!r} is not a tensor')
    arrays[name] = value.materialize(storages)
  return arrays
