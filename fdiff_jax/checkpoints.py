"""A workdir on disk: the saved config, orbax checkpoints, and restoring them.

A workdir is self-describing: `config.json` sits next to `checkpoints/`, so
later commands need only `--workdir`. Every committed step directory gets a
SHA-256 manifest (`MANIFEST_FILE`); restores verify it, compare the saved
shapes with the state the config builds, and refuse non-finite values, so a
damaged checkpoint is named in one line instead of restoring silently.

An exported model (`fdiff export`) is a workdir with `config.json` and
`ema_params.msgpack` only: the EMA parameters and their step, no optimizer
state; every sampling command loads it alike.
"""

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fdiff_jax import config_utils, images, parallel
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.models import UNet, build_model
from fdiff_jax.train_state import initial_state, make_optimizer

CONFIG_FILE = 'config.json'
EXPORT_FILE = 'ema_params.msgpack'
MANIFEST_FILE = 'fdiff_sha256.json'  # In each step directory: {relative path: sha256}.
DAMAGED_DIR = 'damaged_checkpoints'  # Where training moves steps that fail verification.
LOCK_FILE = '.lock'


class DamagedCheckpoint(UserError):
  """A checkpoint step whose files fail their checksums or cannot be read back."""

  def __init__(self, step, directory, reason):
    super().__init__(f'checkpoint {step} in {directory} is damaged ({reason})')
    self.step = step


def save_config(workdir, config):
  images.write_atomically(
    os.path.join(workdir, CONFIG_FILE),
    lambda f: f.write(config_utils.config_to_json(config).encode()),
  )


def load_config(workdir):
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(
      f'{path} not found: {workdir!r} is not a training workdir '
      '(train one with `fdiff train --config ... --workdir ...`)'
    )
  return config_utils.config_from_json(path.read_text())


def absolute(path):
  """An absolute local path (orbax needs one); URLs such as gs://bucket/run stay as they are."""
  return path if '://' in path else os.path.abspath(path)


def checkpoint_manager(workdir, max_to_keep=None, asynchronous=True):
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous
  )
  return ocp.CheckpointManager(absolute(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager, step, state):
  """Starts an asynchronous save of `state` at `step`, after the previous one is committed.

  The previous save's step directories get their manifests first (see `write_manifests`).
  """
  manager.wait_until_finished()
  write_manifests(manager)
  manager.save(step, args=ocp.args.StandardSave(state))


def _step_dir(manager, step):
  return epath.Path(manager.directory) / str(step)


def _files(folder, prefix=''):
  """(relative name, path) of every file below `folder` (epath: local or cloud)."""
  for path in sorted(folder.iterdir()):
    name = f'{prefix}{path.name}'
    if path.is_dir():
      yield from _files(path, f'{name}/')
    else:
      yield name, path


def _file_digests(step_dir):
  """{path relative to step_dir: sha256 hex} of every checkpoint file below it."""
  return {
    name: hashlib.sha256(path.read_bytes()).hexdigest()
    for name, path in _files(step_dir)
    if not name.startswith(MANIFEST_FILE)  # Nor a temporary left by a killed writer.
  }


def write_manifests(manager):
  """Writes the SHA-256 manifest of every committed step that lacks one (main process only).

  Call it once the saves are committed (`manager.wait_until_finished()`, or
  `manager.is_saving_in_progress()` false: the training loop checks that after
  every step, so a `kill -9` between saves finds the newest step sealed).
  """
  if not parallel.is_main_process():
    return
  for step in manager.all_steps():
    manifest = _step_dir(manager, step) / MANIFEST_FILE
    if not manifest.exists():
      text = json.dumps(_file_digests(_step_dir(manager, step)), indent=0, sort_keys=True)
      tmp = manifest.parent / (MANIFEST_FILE + '.tmp')
      tmp.write_text(text)
      tmp.replace(manifest)


def verify_files(manager, step):
  """True if `step` has a manifest its files match, False if it has none; else DamagedCheckpoint."""
  step_dir = _step_dir(manager, step)
  manifest = step_dir / MANIFEST_FILE
  if not manifest.exists():
    return False
  try:
    expected = json.loads(manifest.read_text())
  except (ValueError, OSError):
    raise DamagedCheckpoint(step, manager.directory, f'{MANIFEST_FILE} is unreadable') from None
  for name, digest in expected.items():
    path = step_dir / name
    if not path.is_file():
      raise DamagedCheckpoint(step, manager.directory, f'{name} is missing')
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
      raise DamagedCheckpoint(step, manager.directory, f'{name} does not match its checksum')
  return True


def _shapes(tree):
  return {
    jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _check_structure(manager, step, abstract):
  """Raises a UserError unless `step` holds the kind and parameter shapes of `abstract`."""
  try:
    saved = ocp.StandardCheckpointer().metadata(_step_dir(manager, step) / 'default')
    saved = dict(getattr(saved, 'item_metadata', saved))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises several kinds.
    raise DamagedCheckpoint(
      step, manager.directory, f'metadata unreadable: {_first_line(e)}'
    ) from None
  diffusion = 'ema_params' in {f.name for f in dataclasses.fields(abstract)}
  if ('ema_params' in saved) != diffusion:  # Only diffusion states keep EMA parameters.
    kinds = ('an attribute classifier', 'a diffusion model')
    raise UserError(
      f'{os.path.dirname(str(manager.directory))} holds {kinds[not diffusion]}, not '
      f'{kinds[diffusion]}; give the workdir of '
      + ('`fdiff train`' if diffusion else '`fdiff train-classifier`')
    )
  have, want = _shapes(saved.get('params', {})), _shapes(abstract.params)
  if have != want:
    key = next(
      (k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)), 'parameters'
    )
    raise UserError(
      f'the config differs from the one checkpoint {step} in {manager.directory} was trained '
      f'with (params{key}: saved {have.get(key, "absent")}, config builds '
      f'{want.get(key, "absent")}); use its config.json or a new --workdir'
    )


def check_resumable(workdir: str, init_fn: Callable[[], Any]) -> None:
  """Before a trainer writes to `workdir`: its latest checkpoint, if any, fits `init_fn()`.

  A changed model config or another kind of workdir is one UserError here,
  before anything is written; a damaged step is left to the training loop.
  """
  exists = (epath.Path(absolute(workdir)) / 'checkpoints').is_dir()
  # Every process looks before any creates the folder: they must all make the
  # same orbax calls, whose barriers are matched by count.
  parallel.barrier('check_resumable')
  if not exists:
    return
  manager = checkpoint_manager(workdir)
  try:
    step = manager.latest_step()
    if step is not None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      try:
        _check_structure(manager, step, abstract_state(init_fn, sharding))
      except DamagedCheckpoint:
        pass
  finally:
    manager.close()


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def restore(manager: ocp.CheckpointManager, abstract: Any, step: int | None = None) -> Any:
  """Restores `abstract`'s structure (with its shardings) at `step` (default latest).

  Raises DamagedCheckpoint when the step's files fail their manifest, cannot be
  read, or hold non-finite values, and a plain UserError when the step holds
  another kind of model or other shapes than `abstract` (a changed config), or
  when reading fails for want of memory, access or I/O (nothing is damaged).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f'no checkpoint in {manager.directory}; train first or check --workdir')
  if step not in manager.all_steps():
    raise UserError(
      f'no checkpoint at step {step} in {manager.directory}; '
      f'available: {sorted(manager.all_steps())}'
    )
  verified = verify_files(manager, step)
  _check_structure(manager, step, abstract)
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exceptions too.
    if _machine_fault(e):  # Nothing says the files are bad: leave them where they are.
      raise UserError(
        f'checkpoint {step} in {manager.directory} could not be read on this machine '
        f'({_first_line(e)}); it was left as it is: free memory or fix access, then retry'
      ) from None
    if verified:  # Intact files, the shapes the config builds, and still unreadable.
      raise UserError(
        f'checkpoint {step} in {manager.directory} matches its checksums but cannot be '
        f'restored ({_first_line(e)}); restore it with the config.json and orbax version '
        'that wrote it'
      ) from None
    raise DamagedCheckpoint(step, manager.directory, _first_line(e)) from None
  if not all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(state) if _is_float(x)):
    raise DamagedCheckpoint(step, manager.directory, 'it holds NaN or Inf values')
  return state


_MACHINE_ERRNOS = {
  errno.EIO,
  errno.ENOMEM,
  errno.ENOSPC,
  errno.EACCES,
  errno.EAGAIN,
  errno.ETIMEDOUT,
}


def _machine_fault(e):
  """True for failures of the machine rather than of the checkpoint: memory, access, I/O."""
  if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS):
    return True
  return any(s in str(e) for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory'))


def _is_float(x):
  return jax.numpy.issubdtype(x.dtype, jax.numpy.floating)


def set_aside(manager, step, workdir):
  """Moves damaged `step` to WORKDIR/damaged_checkpoints/STEP (main process); returns that path."""
  target = epath.Path(absolute(workdir)) / DAMAGED_DIR / str(step)
  if parallel.is_main_process():
    suffix = 0
    while target.exists():
      suffix += 1
      target = target.parent / f'{step}.{suffix}'
    target.parent.mkdir(parents=True, exist_ok=True)
    _step_dir(manager, step).rename(target)
  parallel.barrier(f'set_aside_{step}')
  manager.reload()
  return target


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds WORKDIR/.lock (flock) so two trainers never share a workdir; released on exit.

  The kernel drops the lock when the process dies, so a crash leaves nothing stale.
  Only the main process of a job locks; cloud URLs (gs://...) are not locked.
  """
  if '://' in workdir or not parallel.is_main_process():
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, 'a+')  # pylint: disable=consider-using-with  # Closed below.
  except OSError as e:
    raise UserError(
      f'cannot use {workdir} as a workdir ({e.strerror or e}); choose another'
    ) from None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise UserError(
        f'{workdir} is in use by another training run ({holder} holds {path}); '
        'wait for it to finish or use another --workdir'
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()}')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def abstract_state(init_fn: Callable[[], Any], sharding: jax.sharding.Sharding) -> Any:
  """What `init_fn()` would return, as ShapeDtypeStructs placed with `sharding`.

  The one description of a state's structure: restores fill it in, and a
  fresh start computes `init_fn` itself with the same sharding.
  """
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init_fn)
  )


def load_state(workdir: str, init_fn: Callable[[], Any], step: int | None = None) -> Any:
  """The `init_fn()`-shaped state saved in `workdir` at `step` (default latest), on one device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  manager = checkpoint_manager(workdir)
  try:
    return restore(manager, abstract_state(init_fn, sharding), step)
  except DamagedCheckpoint as e:
    others = [s for s in sorted(manager.all_steps()) if s != e.step]
    hint = (
      f'pick another with --checkpoint-step (steps: {", ".join(map(str, others))})'
      if others
      else 'no other checkpoint to fall back to; train again'
    )
    raise UserError(f'{e}; {hint}') from None
  finally:
    manager.close()


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A trained diffusion workdir, ready for sampling and evaluation."""

  config: ml_collections.ConfigDict
  model: UNet
  params: Any  # The EMA parameters.
  step: int


def load_model(workdir: str, step: int | None = None) -> LoadedModel:
  """The config, model and EMA parameters of a trained workdir (latest checkpoint unless `step`)."""
  config = load_config(workdir)
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  init_fn = functools.partial(initial_state, config, model, make_optimizer(config.train))
  if os.path.isfile(os.path.join(workdir, EXPORT_FILE)):
    return _load_export(workdir, config, model, jax.eval_shape(init_fn).ema_params, step)
  state = load_state(workdir, init_fn, step)
  return LoadedModel(config, model, state.ema_params, int(state.step))


def export_model(workdir: str, out_dir: str, step: int | None = None) -> LoadedModel:
  """Writes `out_dir`: the workdir's config and EMA parameters at `step`, nothing else."""
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f'{out_dir} already exists; export to a new (or empty) folder')
  loaded = load_model(workdir, step)
  payload = {'step': loaded.step, 'ema_params': jax.device_get(loaded.params)}
  save_config(out_dir, loaded.config)
  images.write_atomically(
    os.path.join(out_dir, EXPORT_FILE),
    lambda f: f.write(flax.serialization.msgpack_serialize(payload)),
  )
  return loaded


def _load_export(workdir, config, model, abstract_params, step):
  path = os.path.join(workdir, EXPORT_FILE)
  with open(path, 'rb') as f:
    data = f.read()
  try:
    payload = flax.serialization.msgpack_restore(data)
    saved_step, params = int(payload['step']), payload['ema_params']
    ok = jax.tree.structure(params) == jax.tree.structure(abstract_params) and all(
      np.shape(a) == b.shape
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params))
    )
  except Exception as e:  # msgpack raises several kinds on damaged bytes.
    raise UserError(f'{path} is damaged ({type(e).__name__}); export it again') from None
  if not ok:
    raise UserError(f'{path} does not hold parameters of the model its config.json describes')
  if step is not None and step != saved_step:
    raise UserError(f'{workdir} holds an exported model of step {saved_step} only, not {step}')
  params = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, abstract_params)
  return LoadedModel(config, model, params, saved_step)
