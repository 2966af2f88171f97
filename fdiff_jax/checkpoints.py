"""A workdir on disk: the saved config, orbax checkpoints, and restoring them.

A workdir is self-describing: `config.json` sits next to `checkpoints/`, so
later commands need only `--workdir`.
"""
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from fdiff_jax import config_utils, images
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.models import build_model
from fdiff_jax.train_state import create_train_state, make_optimizer

CONFIG_FILE = 'config.json'


def save_config(workdir, config):
  images.write_atomically(os.path.join(workdir, CONFIG_FILE),
                          lambda f: f.write(config_utils.config_to_json(config).encode()))


def load_config(workdir):
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f'{path} not found: {workdir!r} is not a training workdir '
                    '(train one with `fdiff train --config ... --workdir ...`)')
  return config_utils.config_from_json(path.read_text())


def absolute(path):
  """An absolute local path (orbax needs one); URLs such as gs://bucket/run stay as they are."""
  return path if '://' in path else os.path.abspath(path)


def checkpoint_manager(workdir, max_to_keep=None, asynchronous=True):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(absolute(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(manager, step, state):
  """Starts an asynchronous save of `state` at `step`."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager, abstract_state, step=None):
  """Restores `abstract_state`'s structure (with its shardings) at `step` (default latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f'no checkpoint in {manager.directory}; train first or check --workdir')
  if step not in manager.all_steps():
    raise UserError(f'no checkpoint at step {step} in {manager.directory}; '
                    f'available: {sorted(manager.all_steps())}')
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, OSError, TypeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'checkpoint {step} in {manager.directory} cannot be restored '
                    f'({first_line}); delete it to fall back to an earlier one') from None


def abstract_like(tree, sharding):
  """ShapeDtypeStructs of `tree` placed with `sharding`, for restoring."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_train_state(config, model):
  """Shapes and dtypes of the TrainState that `config` trains, without computing it."""
  tx = make_optimizer(config.train)
  h, w, c = pipeline.image_shape(config)
  a = jnp.zeros((1, model.num_attributes)) if model.num_attributes else None
  init = lambda: create_train_state(
      model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32), a)['params'], tx)
  return jax.eval_shape(init)


def load_model(workdir, step=None):
  """(config, model, EMA params, step) of a trained workdir, for sampling and evaluation."""
  config = load_config(workdir)
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  manager = checkpoint_manager(workdir)
  try:
    state = restore(manager, abstract_like(abstract_train_state(config, model), sharding), step)
  finally:
    manager.close()
  return config, model, state.ema_params, int(state.step)
