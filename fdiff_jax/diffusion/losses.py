"""Forward noising, prediction targets and the training loss with CFG condition dropout."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdiff_jax.diffusion.schedules import Schedule, per_example
from fdiff_jax.errors import lookup

# model_fn(x_t [B,H,W,C], t int32 [B], attributes [B,A] or None) -> output [B,H,W,C].
ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class Prediction(NamedTuple):
  """What a model output means. alpha, sigma are sqrt(ab_t), sqrt(1 - ab_t) per example."""

  target: Callable[..., jax.Array]  # (alpha, sigma, x0, noise) -> the regression target
  eps_and_x0: Callable[..., tuple[jax.Array, jax.Array]]  # (alpha, sigma, x_t, output)
  snr_offset: float  # At fixed x_t, MSE on the target = (SNR + snr_offset) * MSE on x0.


# Name -> Prediction; the names config.diffusion.prediction accepts.
PREDICTIONS = {
  'eps': Prediction(
    target=lambda alpha, sigma, x0, noise: noise,
    eps_and_x0=lambda alpha, sigma, x_t, out: (out, (x_t - sigma * out) / alpha),
    snr_offset=0.0,
  ),
  'v': Prediction(  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
    target=lambda alpha, sigma, x0, noise: alpha * noise - sigma * x0,
    eps_and_x0=lambda alpha, sigma, x_t, out: (
      sigma * x_t + alpha * out,
      alpha * x_t - sigma * out,
    ),
    snr_offset=1.0,
  ),
}


def _prediction(name: str) -> Prediction:
  return lookup(PREDICTIONS, name, 'prediction type')


def _alpha_sigma(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """sqrt(ab_t) and sqrt(1 - ab_t), shaped to broadcast over rank-ndim examples."""
  return (
    per_example(schedule.sqrt_alpha_bars, t, ndim),
    per_example(schedule.sqrt_one_minus_alpha_bars, t, ndim),
  )


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) with the given noise."""
  alpha, sigma = _alpha_sigma(schedule, t, x0.ndim)
  return alpha * x0 + sigma * noise


def training_target(
  schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str
) -> jax.Array:
  """What the model regresses: the noise (eps) or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
  return _prediction(prediction).target(*_alpha_sigma(schedule, t, x0.ndim), x0, noise)


def predict_eps_and_x0(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array, prediction: str
) -> tuple[jax.Array, jax.Array]:
  """Converts a model output at (x_t, t) into its implied (eps, x0); t is [B] or scalar."""
  return _prediction(prediction).eps_and_x0(*_alpha_sigma(schedule, t, x_t.ndim), x_t, output)


def min_snr_weight(snr: jax.Array, gamma: float, prediction: str) -> jax.Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023): min(SNR, gamma) over SNR, or SNR + 1 for v."""
  return jnp.minimum(snr, gamma) / (snr + _prediction(prediction).snr_offset)


def drop_condition(
  rng: jax.Array,
  attributes: jax.Array | None,
  p_uncond: float,
  p_attr_drop: float,
  p_partial: float = 0.0,
) -> jax.Array | None:
  """Zeroes attributes so the model learns the unconditional and partial inputs CFG uses.

  Whole rows are zeroed w.p. p_uncond; single attributes w.p. p_attr_drop; and in a
  p_partial fraction of rows each attribute is kept only w.p. u ~ Uniform(0, 1) drawn per
  row, so prompts naming one, two or three attributes are seen in training too.
  """
  if attributes is None:
    return None
  row_rng, attr_rng = jax.random.split(rng)
  partial_rng, rate_rng, subset_rng = jax.random.split(jax.random.fold_in(rng, 1), 3)
  rows = (attributes.shape[0], 1)
  keep_row = jax.random.bernoulli(row_rng, 1.0 - p_uncond, rows)
  keep_attr = jax.random.bernoulli(attr_rng, 1.0 - p_attr_drop, attributes.shape)
  partial = jax.random.bernoulli(partial_rng, p_partial, rows)
  keep_rate = jnp.where(partial, jax.random.uniform(rate_rng, rows), 1.0)
  keep_attr &= jax.random.uniform(subset_rng, attributes.shape) < keep_rate
  return jnp.where(keep_row & keep_attr, attributes, 0)


def diffusion_loss(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  attributes: jax.Array | None,
  rng: jax.Array,
  *,
  prediction: str = 'eps',
  min_snr_gamma: float = 0.0,
  p_uncond: float = 0.1,
  p_attr_drop: float = 0.0,
  p_partial: float = 0.0,
) -> jax.Array:
  """Batch-mean MSE to the eps/v target at uniformly random t, min-SNR weighted if gamma > 0."""
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps, jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  output = model_fn(x_t, t, drop_condition(drop_rng, attributes, p_uncond, p_attr_drop, p_partial))
  target = training_target(schedule, x0, t, noise, prediction)
  error = jnp.square(output.astype(jnp.float32) - target)
  per_example_loss = jnp.mean(error, axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma > 0:
    per_example_loss *= min_snr_weight(schedule.snr[t], min_snr_gamma, prediction)
  return jnp.mean(per_example_loss)
