"""Load an ml_collections config file and apply `a.b=value` overrides (`--config.a.b=value`)."""

import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections.config_flags import config_path, tuple_parser

from fdiff_jax.errors import UserError, lookup

# Per field type: the parser ml_collections' config_flags uses for it, and what it accepts.
_PARSERS = {
  bool: (flags.BooleanParser(), 'true or false'),
  int: (flags.IntegerParser(), 'an integer'),
  float: (flags.FloatParser(), 'a number'),
  str: (flags.ArgumentParser(), 'a string'),
  tuple: (tuple_parser.TupleParser(), 'a tuple such as 1,2 or (1, 2)'),
}


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the Python file at `path`."""
  if not os.path.isfile(path):
    raise UserError(
      f'config file {path!r} not found; the shipped ones are in configs/, e.g. configs/digits.py'
    )
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


def _check_key(config: ml_collections.ConfigDict, dotted_key: str) -> None:
  """Raises a UserError naming the closest fields unless config.<dotted_key> exists."""
  node, path = config, 'config'
  for name in dotted_key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(
        f'unknown config field config.{dotted_key}: {path} is a single value '
        f'({node!r}), not a group of fields'
      )
    if name not in node:
      close = difflib.get_close_matches(name, list(node), n=3)
      hint = f'did you mean {", ".join(close)}?' if close else f'{path} has {", ".join(node)}'
      raise UserError(f'unknown config field config.{dotted_key}; {hint}')
    node, path = node[name], f'{path}.{name}'


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  """Sets config.<dotted_key> to `text` parsed as the field's current type."""
  _check_key(config, dotted_key)
  field_type = config_path.get_type(dotted_key, config)
  if field_type not in _PARSERS:
    raise UserError(
      f'config.{dotted_key} is a {field_type.__name__}; only '
      f'{", ".join(t.__name__ for t in _PARSERS)} fields can be set from text'
    )
  parser, accepted = _PARSERS[field_type]
  try:
    value = parser.parse(text)
  except ValueError:
    raise UserError(f'config.{dotted_key} = {text!r} is not {accepted}') from None
  config.update_from_flattened_dict({dotted_key: value})


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Config from a file plus ['a.b=value', ...] overrides, checked by `validate`."""
  config = load_config_file(path)
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'override {item!r} needs the form a.b=value')
    apply_override(config, key, value)
  validate(config)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Catches the config mistakes that would otherwise fail late (after training) or deep (in XLA)."""
  # Imported here: these pull in jax, which loading a config file does not need.
  import jax.numpy as jnp

  from fdiff_jax import train_state
  from fdiff_jax.diffusion import losses, schedules, solvers
  from fdiff_jax.models import kernels

  choices = {
    'diffusion.schedule': schedules.SCHEDULES,
    'diffusion.prediction': losses.PREDICTIONS,
    'model.kernels': kernels.CHOICES,
    'sample.sampler': solvers.SAMPLERS,
    'train.lr_schedule': train_state.LR_SCHEDULES,
    'classifier.lr_schedule': train_state.LR_SCHEDULES,
  }
  for key, registry in choices.items():
    value = _get(config, key)
    if value is not None:
      lookup(registry, value, f'config.{key}')
  for key in ('model.dtype', 'model.param_dtype'):
    try:
      jnp.dtype(_get(config, key))
    except TypeError:
      raise UserError(
        f'config.{key} = {_get(config, key)!r} is not a dtype; use e.g. float32 or bfloat16'
      ) from None
  for key in (
    'train.batch_size',
    'train.num_steps',
    'train.log_every',
    'train.checkpoint_every',
    'train.keep_checkpoints',
    'train.sample_every',
    'sample.steps',
    'sample.grid_size',
    'diffusion.timesteps',
    'data.image_size',
    'model.ch',
    'model.num_heads',
    'classifier.batch_size',
    'classifier.num_steps',
    'classifier.log_every',
    'classifier.checkpoint_every',
    'classifier.keep_checkpoints',
  ):
    value = _get(config, key)
    if value is not None and value < 1:
      raise UserError(f'config.{key} = {value} must be at least 1')
  if config.sample.steps > config.diffusion.timesteps:
    raise UserError(
      f'config.sample.steps = {config.sample.steps} must be at most '
      f'config.diffusion.timesteps = {config.diffusion.timesteps}'
    )
  m, size = config.model, config.data.image_size
  if not m.ch_mult or any(not isinstance(k, int) or k < 1 for k in m.ch_mult):
    raise UserError(
      f'config.model.ch_mult = {tuple(m.ch_mult)} must be one or more whole numbers >= 1, '
      'e.g. (1, 2, 2)'
    )
  _check_grid_prompts(config)
  downsamplings = len(m.ch_mult) - 1
  if size % 2**downsamplings:
    raise UserError(
      f'config.data.image_size = {size} must be divisible by {2**downsamplings}: '
      f'the U-Net halves it {downsamplings} times (len(model.ch_mult) - 1)'
    )
  attended = [
    m.ch * mult
    for i, mult in enumerate(m.ch_mult)  # The middle block always attends.
    if size // 2**i in m.attn_resolutions or i == downsamplings
  ]
  if any(channels % m.num_heads for channels in attended):
    raise UserError(
      f'config.model.num_heads = {m.num_heads} must divide the channels of every '
      f'level with attention, {attended}'
    )


def _check_grid_prompts(config):
  """Every training-grid prompt names attributes the configured dataset has."""
  from fdiff_jax.data import attributes, sources  # Imports TensorFlow; only validate needs it.

  names = sources.dataset_spec(config).attribute_names
  if not config.model.conditional:
    return
  for prompt in config.sample.grid_prompts:
    try:
      attributes.parse_attributes(prompt, names)
    except UserError as e:
      raise UserError(
        f'config.sample.grid_prompts has {prompt!r}: {e} (dataset {config.data.dataset!r})'
      ) from None


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
