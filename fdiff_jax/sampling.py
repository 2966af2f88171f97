"""Jitted whole-loop sampling and DDIM inversion for a model and config.

One function serves the training-time grids, `fdiff sample/interpolate/edit`,
`fdiff evaluate` and `fdiff bench`, so they all sample the same way.
"""
import jax
import jax.numpy as jnp

from fdiff_jax import diffusion


def default_steps(config, sampler, steps=None, num_timesteps=None):
  """`steps`, else every timestep for ancestral DDPM, else config.sample.steps."""
  if steps:
    return int(steps)
  return (num_timesteps or config.diffusion.timesteps) if sampler == 'ddpm' else config.sample.steps


def make_sample_fn(model, config, *, sampler=None, steps=None, eta=None, clip_x0=True,
                   start=None):
  """Returns fn(params, x_T, attributes, rng, guidance) -> images in [-1, 1].

  `guidance` is a Python float (w == 1 then costs one model call per step) or
  a per-sample array [B]. Compiled once per input shape (and per float w).
  `start` < T-1 runs the process truncated at timestep `start`, so x_T is then
  x_start (SDEdit); DDIM with eta=0 and clip_x0=False undoes `make_invert_fn`.
  """
  schedule = config_schedule(config, start)
  sampler = sampler or config.sample.sampler
  steps = default_steps(config, sampler, steps, schedule.num_timesteps)
  eta = config.sample.eta if eta is None else eta

  def run(params, x_T, attributes, rng, guidance):
    return diffusion.sample(_model_fn(model, params), schedule, x_T,
                            _condition(config, attributes), rng, sampler=sampler, steps=steps,
                            guidance=guidance, eta=eta, prediction=config.diffusion.prediction,
                            clip_x0=clip_x0)

  jitted = _jit_with_guidance(run)
  return lambda params, x_T, attributes, rng, guidance=1.0: jitted(
      params, x_T, attributes, rng, guidance=guidance)


def make_invert_fn(model, config, *, steps, start=None):
  """Returns fn(params, x0, attributes, guidance) -> x_start by jitted DDIM inversion.

  Sampling back with make_sample_fn(sampler='ddim', steps=steps, eta=0,
  clip_x0=False, start=start) and the same attributes and guidance reconstructs x0.
  """
  schedule = config_schedule(config, start)

  def run(params, x0, attributes, guidance):
    return diffusion.ddim_invert(_model_fn(model, params), schedule, x0,
                                 _condition(config, attributes), steps=int(steps),
                                 guidance=guidance, prediction=config.diffusion.prediction)

  jitted = _jit_with_guidance(run)
  return lambda params, x0, attributes, guidance=1.0: jitted(
      params, x0, attributes, guidance=guidance)


def config_schedule(config, start=None):
  """The noise schedule the model was trained with, truncated after timestep `start` if given.

  Per-timestep arrays keep their indices, so t stays meaningful.
  """
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  return schedule if start is None else jax.tree.map(lambda a: a[:start + 1], schedule)


# DDIM inversion stops at the last timestep whose alpha_bar is at least this: sampling
# back divides by sqrt(alpha_bar), which amplifies the inversion's eps mismatch (the
# cosine schedule ends at 2.4e-9, ~20,000x). At 1e-3 (<= 32x) a 1,000-step synthetic-
# CelebA model reconstructed a photo closely where 1e-5 (<= 316x) left heavy artefacts;
# the latent there keeps only 3% signal, so edits still start from almost pure noise.
MIN_INVERSION_ALPHA_BAR = 1e-3


def inversion_start(config):
  """The last timestep that DDIM inversion may reach, by MIN_INVERSION_ALPHA_BAR."""
  alpha_bars = jax.device_get(config_schedule(config).alpha_bars)
  return int((alpha_bars >= MIN_INVERSION_ALPHA_BAR).sum()) - 1


def _model_fn(model, params):
  """model_fn(x, t, attributes) with `params` bound, as the diffusion core expects."""
  return lambda x, t, a: model.apply({'params': params}, x, t, a)


def _condition(config, attributes):
  """The attributes, or None for an unconditional model (which takes no attribute input)."""
  return attributes if config.model.conditional else None


def _jit_with_guidance(run):
  """jit of run(..., guidance): a Python float w is static, an array w is traced."""
  static_w = jax.jit(run, static_argnames='guidance')
  traced_w = jax.jit(run)

  def call(*args, guidance):
    if isinstance(guidance, (int, float)):
      return static_w(*args, guidance=float(guidance))
    return traced_w(*args, guidance=jnp.asarray(guidance, jnp.float32))

  return call
