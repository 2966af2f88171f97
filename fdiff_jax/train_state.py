"""Training state (step, params, EMA params, optimizer state) and the optimizer."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fdiff_jax.data import pipeline
from fdiff_jax.errors import lookup
from fdiff_jax.models import UNet, initial_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def _constant(peak: float, decay_steps: int) -> optax.Schedule:
  del decay_steps  # Constant schedules do not decay.
  return optax.constant_schedule(peak)


# Name -> schedule(peak, decay_steps) after warm-up; the names config.*.lr_schedule accepts.
LR_SCHEDULES = {'constant': _constant, 'cosine': optax.cosine_decay_schedule}


def learning_rate_schedule(train_config):
  """Linear warm-up, then constant or cosine decay to zero at num_steps."""
  after_warmup = lookup(LR_SCHEDULES, train_config.lr_schedule, 'lr_schedule')
  warmup = max(int(train_config.warmup_steps), 1)
  peak = train_config.learning_rate
  decay = after_warmup(peak, max(train_config.num_steps - warmup, 1))
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(train_config):
  """AdamW with global-norm gradient clipping."""
  return optax.chain(
    optax.clip_by_global_norm(train_config.grad_clip),
    optax.adamw(
      learning_rate_schedule(train_config), b1=0.9, b2=0.999, weight_decay=train_config.weight_decay
    ),
  )


def ema_decay(train_config, step):
  """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  decay = jnp.asarray(train_config.ema_decay, jnp.float32)
  if train_config.ema_warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
  )


def initial_state(
  config: ml_collections.ConfigDict, model: UNet, tx: optax.GradientTransformation
) -> TrainState:
  """Step 0's TrainState from the config's seed; traceable, so `jax.eval_shape` gives its shapes."""
  params = initial_params(model, jax.random.key(config.seed), pipeline.image_shape(config))
  return create_train_state(params, tx)
