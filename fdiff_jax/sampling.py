"""A jitted whole-loop sampler for a model and config.

One function serves the training-time grids, `fdiff sample/interpolate/edit`,
`fdiff evaluate` and `fdiff bench`, so they all sample the same way.
"""
import jax
import jax.numpy as jnp

from fdiff_jax import diffusion


def make_sample_fn(model, config, *, sampler=None, steps=None, eta=None):
  """Returns fn(params, x_T, attributes, rng, guidance) -> images in [-1, 1].

  `guidance` is a Python float (w == 1 then costs one model call per step) or
  a per-sample array [B]. Compiled once per input shape (and per float w).
  """
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  sampler = sampler or config.sample.sampler
  if not steps:  # DDPM is ancestral over every timestep.
    steps = schedule.num_timesteps if sampler == 'ddpm' else config.sample.steps
  steps = int(steps)
  eta = config.sample.eta if eta is None else eta
  conditional = bool(config.model.conditional)

  def run(params, x_T, attributes, rng, guidance):
    model_fn = lambda x, t, a: model.apply({'params': params}, x, t, a)
    return diffusion.sample(model_fn, schedule, x_T, attributes if conditional else None, rng,
                            sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                            prediction=config.diffusion.prediction)

  static_w = jax.jit(run, static_argnames='guidance')
  traced_w = jax.jit(run)

  def sample_fn(params, x_T, attributes, rng, guidance=1.0):
    if isinstance(guidance, (int, float)):
      return static_w(params, x_T, attributes, rng, guidance=float(guidance))
    return traced_w(params, x_T, attributes, rng, jnp.asarray(guidance, jnp.float32))

  return sample_fn
