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
import math
import os
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


class _StorageRef:
  """A storage named by the file's persistent ids; a pickle cannot build one itself."""

  def __init__(self, key, dtype):
    self.key, self.dtype = key, dtype


class _LazyTensor:
  """A tensor whose storage bytes may come later in the file (legacy format)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def materialize(self, storages, name):
    """A numpy copy of the strided view into storages[key], checked against its bounds.

    Every size, stride and the offset must be non-negative integers, the last
    element the view reaches must lie inside the storage and the view may not
    hold more elements than the storage; a crafted file could otherwise make
    `as_strided` read (or crash on) memory outside it, or ask for exabytes.
    """
    if not isinstance(self.storage, _StorageRef):
      raise ValueError(f'tensor {name!r} names {self.storage!r} as its storage, not a storage')
    key, dtype = self.storage.key, self.storage.dtype
    if key not in storages:
      raise ValueError(f'tensor {name!r} refers to storage {key!r}, which the file lacks')
    flat = storages[key]
    sequences = all(isinstance(x, (tuple, list)) for x in (self.size, self.stride))
    if (
      not sequences
      or len(self.stride) != len(self.size)
      or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0
        for n in (self.offset, *self.size, *self.stride)
      )
    ):
      raise ValueError(
        f'tensor {name!r} has a malformed layout (offset {self.offset!r}, size '
        f'{self.size!r}, stride {self.stride!r})'
      )
    size, stride = tuple(self.size), tuple(self.stride)
    if 0 in size:
      return np.zeros(size, dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
    layout = f'tensor {name!r} (size {size}, stride {stride}, offset {self.offset})'
    if last >= len(flat):
      raise ValueError(f'{layout} reaches element {last} of a storage of {len(flat)}')
    if math.prod(size) > len(flat):  # Only by reading elements more than once.
      raise ValueError(f'{layout} has more elements than its storage of {len(flat)}')
    if not size:
      return flat[self.offset].copy()
    return np.array(
      np.lib.stride_tricks.as_strided(
        flat[self.offset :], shape=size, strides=tuple(s * dtype.itemsize for s in stride)
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
    return _StorageRef(key, storage_type.dtype)


def _read_zip(path):
  with zipfile.ZipFile(path) as archive:
    pickle_name = next((n for n in archive.namelist() if n.rpartition('/')[2] == 'data.pkl'), None)
    if pickle_name is None:
      raise ValueError(f'{path} is a zip file without data.pkl, not a torch checkpoint')
    prefix = pickle_name[: -len('data.pkl')]
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickle_name)))
    result = unpickler.load()
    storages = {}
    for key, dtype in unpickler.storages.items():
      try:
        data = archive.read(f'{prefix}data/{key}')
      except KeyError:
        raise ValueError(f'{path} lacks storage {prefix}data/{key}') from None
      storages[key] = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype)
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
    size = os.fstat(f.fileno()).st_size
    for key in _RestrictedUnpickler(f).load():
      if str(key) not in unpickler.storages:
        raise ValueError(f'{path} lists storage {key!r}, which no tensor uses')
      dtype = unpickler.storages[str(key)]
      header = f.read(8)
      numel = struct.unpack('<q', header)[0] if len(header) == 8 else -1
      fits = 0 <= numel * dtype.itemsize <= size - f.tell()  # Never read more than is there.
      data = f.read(numel * dtype.itemsize) if fits else b''
      if not fits or len(data) != numel * dtype.itemsize:
        raise ValueError(f'{path} is truncated or malformed at storage {key!r}')
      storages[str(key)] = np.frombuffer(data, dtype)
  return result, storages


def load_state_dict(path):
  """{name: np.ndarray} of a torch state dict file, never executing code from it.

  Damaged or crafted files raise ValueError (or UnsafeWeightsError), never read
  outside the file's own bytes.
  """
  try:
    result, storages = (_read_zip if zipfile.is_zipfile(path) else _read_legacy)(path)
    if not isinstance(result, dict):
      raise ValueError(f'{path} holds a {type(result).__name__}, not a state dict')
    arrays = {}
    for name, value in result.items():
      if not isinstance(value, _LazyTensor):
        raise ValueError(f'{path}: entry {name!r} is not a tensor')
      arrays[name] = value.materialize(storages, name)
    return arrays
  except (UnsafeWeightsError, ValueError, OSError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # The bytes are untrusted: whatever else a damaged or crafted pickle makes the
    # unpickler or the checks trip over (TypeError, OverflowError, EOFError, ...)
    # means the same thing.
    raise ValueError(
      f'{path} is damaged or not a tensor state dict ({type(e).__name__}: {e})'
    ) from None
