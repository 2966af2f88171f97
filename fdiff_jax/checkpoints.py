"""A workdir on disk: the saved config, orbax checkpoints, and restoring them.

A workdir is self-describing: `config.json` sits next to `checkpoints/`, so
later commands need only `--workdir`. An exported model (`fdiff export`) is a
workdir with `config.json` and `ema_params.msgpack` only: the EMA parameters
and their step, no optimizer state; every sampling command loads it alike.
"""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fdiff_jax import config_utils, images
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.models import UNet, build_model
from fdiff_jax.train_state import initial_state, make_optimizer

CONFIG_FILE = 'config.json'
EXPORT_FILE = 'ema_params.msgpack'


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
  """Starts an asynchronous save of `state` at `step`."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, abstract: Any, step: int | None = None) -> Any:
  """Restores `abstract`'s structure (with its shardings) at `step` (default latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f'no checkpoint in {manager.directory}; train first or check --workdir')
  if step not in manager.all_steps():
    raise UserError(
      f'no checkpoint at step {step} in {manager.directory}; '
      f'available: {sorted(manager.all_steps())}'
    )
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, OSError, TypeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f'checkpoint {step} in {manager.directory} cannot be restored '
      f'({first_line}); delete it to fall back to an earlier one'
    ) from None


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
