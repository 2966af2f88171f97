"""Load an ml_collections config file and apply `--config.a.b=value` overrides."""
import ast
import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from fdiff_jax.errors import UserError


def load_config_file(path):
  """Runs `get_config()` of the Python file at `path`."""
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} not found; pass e.g. --config configs/digits.py')
  # Variants import their base (`from configs import default`): make the folder
  # holding the `configs` package importable, wherever the command runs from.
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('_fdiff_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (ImportError, SyntaxError) as e:
    raise UserError(f'config file {path!r} cannot be loaded: {e}') from None
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path!r} defines no get_config()')
  return module.get_config()


def _parse_value(text, old):
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(old, bool) and text.lower() in ('true', 'false'):
      return text.lower() == 'true'
    raise UserError(f'cannot parse {text!r} as a {type(old).__name__}') from None
  if isinstance(old, bool) and not isinstance(value, bool):
    raise UserError(f'expected True or False, got {text!r}')
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
    value = (value,)
  if isinstance(old, tuple):
    value = tuple(value)
  return value


def apply_override(config, dotted_key, text):
  """Sets config[a][b] = parsed text; unknown keys name the closest valid ones."""
  *parents, leaf = dotted_key.split('.')
  node = config
  for i, name in enumerate(parents + [leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      where = '.'.join(parents[:i]) or 'config'
      valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(name, valid, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
      raise UserError(f'unknown config key {dotted_key!r} ({name!r} not in {where}){hint}')
    if name != leaf:
      node = node[name]
  try:
    node[leaf] = _parse_value(text, node[leaf])
  except (UserError, TypeError) as e:  # TypeError: ml_collections refuses a change of type.
    message = str(e).split(' (reference). ')[-1]
    raise UserError(f'--config.{dotted_key}: {message}') from None


def load_config(path, overrides=()):
  """Config from a file plus ['a.b=value', ...] overrides, checked by `validate`."""
  config = load_config_file(path)
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'override {item!r} needs the form --config.a.b=value')
    apply_override(config, key, value)
  validate(config)
  return config


def validate(config):
  """Catches the config mistakes that would otherwise fail late (after training) or deep (in XLA)."""
  # Imported here: these pull in jax, which loading a config file does not need.
  import jax.numpy as jnp
  from fdiff_jax import train_state
  from fdiff_jax.diffusion import losses, samplers, schedules
  from fdiff_jax.models import kernels
  choices = {'diffusion.schedule': schedules.SCHEDULES, 'diffusion.prediction': losses.PREDICTIONS,
             'model.kernels': kernels.CHOICES,
             'sample.sampler': samplers.SAMPLERS, 'train.lr_schedule': train_state.LR_SCHEDULES,
             'classifier.lr_schedule': train_state.LR_SCHEDULES}
  for key, valid in choices.items():
    value = _get(config, key)
    if value is not None and value not in valid:
      raise UserError(f'config.{key} = {value!r}; use one of {", ".join(valid)}')
  for key in ('model.dtype', 'model.param_dtype'):
    try:
      jnp.dtype(_get(config, key))
    except TypeError:
      raise UserError(f'config.{key} = {_get(config, key)!r} is not a dtype; use e.g. float32 '
                      'or bfloat16') from None
  for key in ('train.batch_size', 'train.num_steps', 'sample.steps', 'diffusion.timesteps',
              'data.image_size', 'model.ch', 'model.num_heads'):
    value = _get(config, key)
    if value is not None and value < 1:
      raise UserError(f'config.{key} = {value} must be at least 1')
  m, size = config.model, config.data.image_size
  downsamplings = len(m.ch_mult) - 1
  if size % 2 ** downsamplings:
    raise UserError(f'config.data.image_size = {size} must be divisible by {2 ** downsamplings}: '
                    f'the U-Net halves it {downsamplings} times (len(model.ch_mult) - 1)')
  attended = [m.ch * mult for i, mult in enumerate(m.ch_mult)  # The middle block always attends.
              if size // 2 ** i in m.attn_resolutions or i == downsamplings]
  if any(channels % m.num_heads for channels in attended):
    raise UserError(f'config.model.num_heads = {m.num_heads} must divide the channels of every '
                    f'level with attention, {attended}')


def _get(config, dotted_key):
  """config['a']['b'] for 'a.b', or None where a variant lacks the field."""
  node = config
  for name in dotted_key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return None
    node = node[name]
  return node


def config_to_json(config):
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text):
  """Inverse of config_to_json (lists become tuples again, as configs use them)."""
  def tuples(obj):
    if isinstance(obj, dict):
      return {k: tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
      return tuple(tuples(v) for v in obj)
    return obj
  return ml_collections.ConfigDict(tuples(json.loads(text)))
