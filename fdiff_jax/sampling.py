"""Jitted whole-loop sampling and DDIM inversion for a model and config.

One function serves the training-time grids, `fdiff sample/interpolate/edit`,
`fdiff evaluate` and `fdiff bench`, so they all sample the same way.
"""
import jax
import jax.numpy as jnp

from fdiff_jax import diffusion


def make_sample_fn(model, config, *, sampler=None, steps=None, eta=None, clip_x0=True,
                   start=None):
  """Returns fn(params, x_T, attributes, rng, guidance) -> images in [-1, 1].

  `guidance` is a Python float (w == 1 then costs one model call per step) or
  a per-sample array [B]. Compiled once per input shape (and per float w).
  `start` < T-1 runs the process truncated at timestep `start`, so x_T is then
  x_start (SDEdit); DDIM with eta=0 and clip_x0=False undoes `make_invert_fn`.
  """
  schedule = config_schedule(config)
  if start is not None:  # Per-timestep arrays keep their indices, so t stays meaningful.
    schedule = jax.tree.map(lambda a: a[:start + 1], schedule)
  sampler = sampler or config.sample.sampler
  if not steps:  # DDPM is ancestral over every timestep.
    steps = schedule.num_timesteps if sampler == 'ddpm' else config.sample.steps
  steps = int(steps)
  eta = config.sample.eta if eta is None else eta

  def run(params, x_T, attributes, rng, guidance):
    return diffusion.sample(_model_fn(model, params), schedule, x_T,
                            _condition(config, attributes), rng, sampler=sampler, steps=steps,
                            guidance=guidance, eta=eta, prediction=config.diffusion.prediction,
                            clip_x0=clip_x0)

  jitted = _jit_with_guidance(run)
  return lambda params, x_T, attributes, rng, guidance=1.0: jitted(
      params, x_T, attributes, rng, guidance=guidance)


def make_invert_fn(model, config, *, steps):
  """Returns fn(params, x0, attributes, guidance) -> x_T by jitted DDIM inversion.

  Sampling back with make_sample_fn(sampler='ddim', steps=steps, eta=0,
  clip_x0=False) and the same attributes and guidance reconstructs x0.
  """
  schedule = config_schedule(config)

  def run(params, x0, attributes, guidance):
    return diffusion.ddim_invert(_model_fn(model, params), schedule, x0,
                                 _condition(config, attributes), steps=int(steps),
                                 guidance=guidance, prediction=config.diffusion.prediction)

  jitted = _jit_with_guidance(run)
  return lambda params, x0, attributes, guidance=1.0: jitted(
      params, x0, attributes, guidance=guidance)


def config_schedule(config):
  """The noise schedule the model was trained with."""
  return diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)


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
