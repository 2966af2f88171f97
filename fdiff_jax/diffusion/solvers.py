"""Reverse-process solvers (DDPM, DDIM, DPM-Solver++) with CFG, and DDIM inversion.

Every solver runs its whole reverse loop as one `lax.scan`, so under `jax.jit` the model is
traced once whatever the number of steps. DDIM, DPM-Solver++ and `ddim_invert` share one
timestep grid (`sampling_timesteps`): `steps` evenly spaced timesteps starting at T-1, each
step moving to the next grid point and the last one to the clean image (alpha_bar = 1).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdiff_jax.diffusion.losses import ModelFn, predict_eps_and_x0
from fdiff_jax.diffusion.schedules import Schedule
from fdiff_jax.errors import UserError, lookup

Guidance = float | jax.Array


def sampling_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """Descending grid of `steps` evenly spaced timesteps from T-1 ("trailing" spacing).

  Starting at T-1 matches x_T ~ N(0, I) even for few steps; steps == T visits every timestep.
  """
  if not 1 <= steps <= num_timesteps:
    raise UserError(f'sampling steps must be in [1, {num_timesteps}], got {steps}')
  remaining = np.arange(steps, 0, -1)
  return (num_timesteps * remaining // steps - 1).astype(np.int32)


def guided_output(
  model_fn: ModelFn, x: jax.Array, t: jax.Array, attributes: jax.Array | None, guidance: Guidance
) -> jax.Array:
  """CFG output uncond + w (cond - uncond), both branches in one batched model call.

  Guiding the raw output is the same as guiding eps for v-prediction too: at fixed x_t the
  eps implied by an output is affine in it. w is a scalar or per-sample [B]; a Python w == 1
  or an unconditional model (attributes None) needs just the plain conditional call.
  """
  if attributes is None or (isinstance(guidance, (int, float)) and guidance == 1.0):
    return model_fn(x, t, attributes)
  both = model_fn(
    jnp.concatenate([x, x]),
    jnp.concatenate([t, t]),
    jnp.concatenate([attributes, jnp.zeros_like(attributes)]),
  )
  cond, uncond = jnp.split(both, 2)
  w = jnp.asarray(guidance, jnp.float32)
  w = w.reshape(w.shape + (1,) * (cond.ndim - w.ndim))
  return uncond + w * (cond - uncond)


def ddim_sigma(alpha_bar: jax.Array, alpha_bar_prev: jax.Array, eta: float) -> jax.Array:
  """DDIM step noise std (Song et al. 2021, eq. 16); eta=1 gives the DDPM posterior std."""
  return eta * jnp.sqrt(
    (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
  )


def _denoise(model_fn, schedule, x, t, attributes, guidance, prediction, clip_x0):
  """Guided (eps, x0) at timestep t; a clipped x0 gets the eps consistent with it and x_t."""
  t_batch = jnp.full((x.shape[0],), t, jnp.int32)
  output = guided_output(model_fn, x, t_batch, attributes, guidance).astype(x.dtype)
  eps, x0 = predict_eps_and_x0(schedule, x, t_batch, output, prediction)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - schedule.sqrt_alpha_bars[t] * x0) / schedule.sqrt_one_minus_alpha_bars[t]
  return eps, x0


def _grid_alpha_bars(schedule: Schedule, steps: int):
  """The grid and alpha_bar at each grid point and at the point after it (1 after the last)."""
  grid = sampling_timesteps(schedule.num_timesteps, steps)
  alpha_bar = schedule.alpha_bars[grid]
  return grid, alpha_bar, jnp.append(alpha_bar[1:], 1.0)


def ddpm_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  attributes: jax.Array | None,
  rng: jax.Array,
  *,
  steps: int,
  guidance: Guidance = 1.0,
  prediction: str = 'eps',
  clip_x0: bool = True,
) -> jax.Array:
  """Ancestral sampling (Ho et al. 2020) from the posterior q(x_{t-1} | x_t, x0) over all T.

  `steps` must be T: it is taken so all solvers share one signature, and checked so a shorter
  run is an error rather than silently all T steps.
  """
  T = schedule.num_timesteps
  if steps != T:
    raise UserError(
      f"sampler 'ddpm' runs all {T} steps, got steps={steps}; set steps={T} or use 'ddim'/'dpm++'"
    )

  def step(x, i):
    t = T - 1 - i
    _, x0 = _denoise(model_fn, schedule, x, t, attributes, guidance, prediction, clip_x0)
    mean = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x
    std = jnp.where(t > 0, jnp.exp(0.5 * schedule.posterior_log_variance_clipped[t]), 0.0)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return mean + std * noise, None

  x, _ = lax.scan(step, x_T, jnp.arange(T))
  return x


def ddim_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  attributes: jax.Array | None,
  rng: jax.Array,
  *,
  steps: int,
  eta: float = 0.0,
  guidance: Guidance = 1.0,
  prediction: str = 'eps',
  clip_x0: bool = True,
) -> jax.Array:
  """DDIM (Song et al. 2021) on the shared grid; eta=0 is deterministic, eta=1 is DDPM-like."""
  if isinstance(eta, (int, float)) and not 0 <= eta <= 1:
    raise UserError(f'DDIM eta must be in [0, 1], got {eta}')
  deterministic = isinstance(eta, (int, float)) and eta == 0  # then draw no noise at all

  def step(x, xs):
    i, t, alpha_bar, alpha_bar_prev = xs
    eps, x0 = _denoise(model_fn, schedule, x, t, attributes, guidance, prediction, clip_x0)
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    x_prev = (
      jnp.sqrt(alpha_bar_prev) * x0
      + jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
    )
    if deterministic:
      return x_prev, None
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return x_prev + sigma * noise, None

  grid, alpha_bar, alpha_bar_prev = _grid_alpha_bars(schedule, steps)
  x, _ = lax.scan(step, x_T, (jnp.arange(steps), grid, alpha_bar, alpha_bar_prev))
  return x


def dpmpp_2m_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  attributes: jax.Array | None,
  rng: jax.Array,
  *,
  steps: int,
  guidance: Guidance = 1.0,
  prediction: str = 'eps',
  clip_x0: bool = True,
) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022): multistep second-order ODE solver on x0 predictions.

  With h the step in lambda = log(alpha / sigma), each step is
  x' = (sigma' / sigma) x + alpha' (1 - e^-h) D, D = x0 + h / (2 h_prev) (x0 - x0_prev).
  The first step and the last one (into sigma = 0, where h is infinite) are first order
  (D = x0), so the last step returns the final x0 prediction. `rng` is unused: the solver is
  deterministic; it is accepted so all solvers share one signature.
  """
  del rng

  def step(carry, xs):
    x, x0_prev = carry
    t, sigma_ratio, data_coef, correction = xs
    _, x0 = _denoise(model_fn, schedule, x, t, attributes, guidance, prediction, clip_x0)
    d = x0 + correction * (x0 - x0_prev)
    return (sigma_ratio * x + data_coef * d, x0), None

  grid, alpha_bar, alpha_bar_next = _grid_alpha_bars(schedule, steps)
  lam = 0.5 * schedule.log_snr[grid]
  lam_next = jnp.append(lam[1:], jnp.inf)
  h = lam_next - lam
  sigma_ratio = jnp.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar))
  data_coef = -jnp.sqrt(alpha_bar_next) * jnp.expm1(-h)
  index = np.arange(steps)
  second_order = (index > 0) & (index < steps - 1)
  h_prev = jnp.append(1.0, h[:-1])
  correction = jnp.where(second_order, h / (2.0 * h_prev), 0.0)
  (x, _), _ = lax.scan(step, (x_T, jnp.zeros_like(x_T)), (grid, sigma_ratio, data_coef, correction))
  return x


def ddim_invert(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  attributes: jax.Array | None,
  *,
  steps: int,
  guidance: Guidance = 1.0,
  prediction: str = 'eps',
) -> jax.Array:
  """Deterministic DDIM inversion x0 -> x_T, undone by ddim_sample(eta=0, clip_x0=False).

  Walks the sampling grid backwards; each step reuses the DDIM update with eps taken at the
  current, less noisy point under the target timestep's label (the sampler evaluates it at
  the target point itself), so the round trip is exact only as the step size goes to 0.
  """

  def step(x, xs):
    t, alpha_bar_from, alpha_bar_to = xs
    eps, _ = _denoise(model_fn, schedule, x, t, attributes, guidance, prediction, False)
    x0_hat = (x - jnp.sqrt(1.0 - alpha_bar_from) * eps) / jnp.sqrt(alpha_bar_from)
    return jnp.sqrt(alpha_bar_to) * x0_hat + jnp.sqrt(1.0 - alpha_bar_to) * eps, None

  grid, alpha_bar, alpha_bar_prev = _grid_alpha_bars(schedule, steps)
  x, _ = lax.scan(step, x0, (grid, alpha_bar_prev, alpha_bar), reverse=True)
  return x


# Name -> solver; the names config.sample.sampler accepts.
SAMPLERS = {'ddpm': ddpm_sample, 'ddim': ddim_sample, 'dpm++': dpmpp_2m_sample}


def sample(
  model_fn: ModelFn,
  schedule: Schedule,
  x_T: jax.Array,
  attributes: jax.Array | None,
  rng: jax.Array,
  *,
  sampler: str,
  steps: int,
  guidance: Guidance = 1.0,
  eta: float = 0.0,
  prediction: str = 'eps',
  clip_x0: bool = True,
) -> jax.Array:
  """Runs the named solver ('ddpm' needs steps == T; eta only affects 'ddim')."""
  solve = lookup(SAMPLERS, sampler, 'sampler')
  noise = {'eta': eta} if solve is ddim_sample else {}
  return solve(
    model_fn,
    schedule,
    x_T,
    attributes,
    rng,
    steps=steps,
    guidance=guidance,
    prediction=prediction,
    clip_x0=clip_x0,
    **noise,
  )
