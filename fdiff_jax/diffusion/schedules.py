"""Noise schedules: the betas and every per-timestep quantity derived from them."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fdiff_jax.errors import UserError, lookup


@flax.struct.dataclass
class Schedule:
  """Per-timestep diffusion coefficients, float32 arrays of length T (a pytree)."""

  betas: jax.Array
  alphas: jax.Array
  alpha_bars: jax.Array
  sqrt_alpha_bars: jax.Array
  sqrt_one_minus_alpha_bars: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  snr: jax.Array
  log_snr: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, static even when the arrays are traced."""
    return self.betas.shape[0]


def linear_betas(timesteps: int) -> np.ndarray:
  """DDPM betas 1e-4..0.02 for T=1000, scaled by 1000/T to keep alpha_bar_T similar."""
  scale = 1000.0 / timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
  """Improved-DDPM alpha_bar(t) for continuous t in [0, 1], normalised so alpha_bar(0) = 1."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  return f(t) / f(0.0)


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas reproducing cosine_alpha_bar at t/T, clipped so the last steps stay invertible."""
  alpha_bar = cosine_alpha_bar(np.arange(timesteps + 1, dtype=np.float64) / timesteps)
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


# Name -> betas(timesteps); the names config.diffusion.schedule accepts.
SCHEDULES = {'linear': linear_betas, 'cosine': cosine_betas}


def make_schedule(kind: str, timesteps: int = 1000) -> Schedule:
  """Builds a Schedule of the given kind, computed in float64 and stored in float32."""
  make_betas = lookup(SCHEDULES, kind, 'noise schedule')
  if timesteps < 2:
    raise UserError(f'diffusion timesteps must be at least 2, got {timesteps}')
  betas = make_betas(timesteps)
  alphas = 1.0 - betas
  alpha_bars = np.cumprod(alphas)
  alpha_bars_prev = np.append(1.0, alpha_bars[:-1])
  posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
  # The variance is 0 at t=0; its log is clipped to the t=1 value (as in DDPM).
  clipped = np.append(posterior_variance[1], posterior_variance[1:])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
    betas=f32(betas),
    alphas=f32(alphas),
    alpha_bars=f32(alpha_bars),
    sqrt_alpha_bars=f32(np.sqrt(alpha_bars)),
    sqrt_one_minus_alpha_bars=f32(np.sqrt(1.0 - alpha_bars)),
    posterior_variance=f32(posterior_variance),
    posterior_log_variance_clipped=f32(np.log(clipped)),
    posterior_mean_coef1=f32(betas * np.sqrt(alpha_bars_prev) / (1.0 - alpha_bars)),
    posterior_mean_coef2=f32((1.0 - alpha_bars_prev) * np.sqrt(alphas) / (1.0 - alpha_bars)),
    snr=f32(alpha_bars / (1.0 - alpha_bars)),
    log_snr=f32(np.log(alpha_bars) - np.log1p(-alpha_bars)),
  )


def per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] shaped [B, 1, ..., 1] (rank ndim) so it broadcasts over each example."""
  picked = values[t]
  return picked.reshape(picked.shape + (1,) * (ndim - picked.ndim))
