"""Forward noising, prediction targets and the training loss with CFG condition dropout."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fdiff_jax.diffusion.schedules import Schedule, per_example
from fdiff_jax.errors import UserError

PREDICTIONS = ('eps', 'v')

# model_fn(x_t [B,H,W,C], t int32 [B], attributes [B,A] or None) -> output [B,H,W,C].
ModelFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def check_prediction(prediction: str) -> None:
  """Raises a UserError unless `prediction` names a supported model output."""
  if prediction not in PREDICTIONS:
    raise UserError(
        f'unknown prediction type {prediction!r}; use one of {", ".join(PREDICTIONS)}')


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) with the given noise."""
  return (per_example(schedule.sqrt_alpha_bars, t, x0.ndim) * x0
          + per_example(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise)


def training_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
                    prediction: str) -> jax.Array:
  """What the model regresses: the noise (eps) or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
  check_prediction(prediction)
  if prediction == 'eps':
    return noise
  return (per_example(schedule.sqrt_alpha_bars, t, x0.ndim) * noise
          - per_example(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * x0)


def predict_eps_and_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array,
                       prediction: str) -> tuple[jax.Array, jax.Array]:
  """Converts a model output at (x_t, t) into its implied (eps, x0); t is [B] or scalar."""
  check_prediction(prediction)
  alpha = per_example(schedule.sqrt_alpha_bars, t, x_t.ndim)
  sigma = per_example(schedule.sqrt_one_minus_alpha_bars, t, x_t.ndim)
  if prediction == 'eps':
    return output, (x_t - sigma * output) / alpha
  return sigma * x_t + alpha * output, alpha * x_t - sigma * output


def min_snr_weight(snr: jax.Array, gamma: float, prediction: str) -> jax.Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023): min(SNR, gamma) over SNR, or SNR + 1 for v."""
  check_prediction(prediction)
  return jnp.minimum(snr, gamma) / (snr if prediction == 'eps' else snr + 1.0)


def drop_condition(rng: jax.Array, attributes: Optional[jax.Array], p_uncond: float,
                   p_attr_drop: float) -> Optional[jax.Array]:
  """Zeroes whole attribute rows w.p. p_uncond and, independently, single attributes w.p.

  p_attr_drop, so the model learns the unconditional and partially specified inputs CFG uses.
  """
  if attributes is None:
    return None
  row_rng, attr_rng = jax.random.split(rng)
  keep_row = jax.random.bernoulli(row_rng, 1.0 - p_uncond, (attributes.shape[0], 1))
  keep_attr = jax.random.bernoulli(attr_rng, 1.0 - p_attr_drop, attributes.shape)
  return jnp.where(keep_row & keep_attr, attributes, 0)


def diffusion_loss(model_fn: ModelFn, schedule: Schedule, x0: jax.Array,
                   attributes: Optional[jax.Array], rng: jax.Array, *, prediction: str = 'eps',
                   min_snr_gamma: float = 0.0, p_uncond: float = 0.1,
                   p_attr_drop: float = 0.0) -> jax.Array:
  """Batch-mean MSE to the eps/v target at uniformly random t, min-SNR weighted if gamma > 0."""
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps, jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  output = model_fn(x_t, t, drop_condition(drop_rng, attributes, p_uncond, p_attr_drop))
  target = training_target(schedule, x0, t, noise, prediction)
  error = jnp.square(output.astype(jnp.float32) - target)
  per_example_loss = jnp.mean(error, axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma > 0:
    per_example_loss *= min_snr_weight(schedule.snr[t], min_snr_gamma, prediction)
  return jnp.mean(per_example_loss)
