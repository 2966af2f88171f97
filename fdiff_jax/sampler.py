"""How an image is sampled: the `Sampler`, built once from (config, model, params).

Training-time grids, `generate` (sample, sweep, interpolate, invert, edit),
`evaluate` and `bench` all sample through it, so every sampling decision is
taken here:
  * the denoiser with classifier-free guidance: uncond + w (cond - uncond), both
    branches in one batched call; w == 1 for every image (or an unconditional
    model) compiles the plain conditional call alone;
  * the solver, steps and eta, defaulting to `config.sample`;
  * seeds -> noise: with (noise key, step key) = split(key(K)), image i of seed K
    starts from normal(fold_in(noise key, i)), whatever the number of images, the
    batch size, the attributes or the guidance; solvers that draw per-step noise
    (DDPM, DDIM with eta > 0) take fold_in(step key, batch index);
  * batching: fixed-size batches, the last one padded, so each program compiles once;
  * compilation caching: the jitted programs live on the Sampler (and are shared by
    `with_params`), keyed by jax.jit on the options and input shapes.

Deterministic solvers (DDIM with eta 0, DPM-Solver++) then give the same image
for the same seed and attributes in any call, to float rounding (~1e-5): XLA's
kernels may round differently by batch shape and position in the batch.
"""

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdiff_jax import batching, diffusion
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError

DEFAULT_BATCH_SIZE = 32
Guidance = float | np.ndarray | None

# DDIM inversion stops at the last timestep whose alpha_bar is at least this: sampling
# back divides by sqrt(alpha_bar), which amplifies the inversion's eps mismatch (the
# cosine schedule ends at alpha_bar 2.4e-9). At 1e-3 the amplification is at most 32x
# and the latent still keeps only 3% signal, so edits start from almost pure noise.
MIN_INVERSION_ALPHA_BAR = 1e-3


def default_steps(
  config, sampler: str, steps: int | None = None, num_timesteps: int | None = None
) -> int:
  """`steps`, else every timestep for ancestral DDPM, else config.sample.steps."""
  if steps:
    return int(steps)
  return (num_timesteps or config.diffusion.timesteps) if sampler == 'ddpm' else config.sample.steps


def config_schedule(config, start: int | None = None) -> diffusion.Schedule:
  """The noise schedule the model was trained with, truncated after timestep `start` if given.

  Per-timestep arrays keep their indices, so t stays meaningful.
  """
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  return schedule if start is None else jax.tree.map(lambda a: a[: start + 1], schedule)


def inversion_start(config) -> int:
  """The last timestep that DDIM inversion may reach, by MIN_INVERSION_ALPHA_BAR."""
  alpha_bars = jax.device_get(config_schedule(config).alpha_bars)
  return int((alpha_bars >= MIN_INVERSION_ALPHA_BAR).sum()) - 1


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(noise key, step key): independent streams for starting noise and per-step noise."""
  noise_key, step_key = jax.random.split(jax.random.key(seed))
  return noise_key, step_key


def check_attributes(config, attributes) -> np.ndarray:
  """float32 [N, A] attributes, checked against the model's vocabulary size and conditioning."""
  attributes = np.asarray(attributes, np.float32)
  names = pipeline.attribute_names(config)
  if attributes.ndim != 2 or attributes.shape[1] != len(names):
    raise UserError(
      f'attribute vectors of shape {attributes.shape} do not fit this model: it '
      f"knows the {len(names)} attributes of dataset '{config.data.dataset}'"
    )
  if not config.model.conditional and attributes.any():
    raise UserError(
      'this model is unconditional (trained without attributes); leave the attributes empty'
    )
  return attributes


@dataclasses.dataclass(frozen=True)
class Options:
  """What a sampling program is compiled for (hashable: a jit static argument).

  `start` < T-1 runs the process truncated at timestep `start`, so x_T is then
  x_start (SDEdit, or sampling back a DDIM inversion with eta 0 and clip_x0 False).
  """

  solver: str
  steps: int
  eta: float = 0.0
  clip_x0: bool = True
  start: int | None = None


class Sampler:
  """Samples and inverts images of one model; see the module docstring for its conventions.

  `params` may live on one device or be replicated over a mesh (training grids);
  inputs are placed like them. `batch_size` defaults to min(N, DEFAULT_BATCH_SIZE).
  `progress(done, total)` hears about each finished batch of a call.
  """

  def __init__(
    self,
    config,
    model: nn.Module,
    params: Any,
    *,
    batch_size: int | None = None,
    progress: batching.Progress | None = None,
  ):
    self.config, self.model, self.params = config, model, params
    self.batch_size, self.progress = batch_size, progress
    self.conditional = bool(config.model.conditional)
    self.image_shape = pipeline.image_shape(config)
    self._sample_static_w = jax.jit(self._sample_program, static_argnames=('w', 'options'))
    self._sample_traced_w = jax.jit(self._sample_program, static_argnames=('options',))
    self._invert_static_w = jax.jit(self._invert_program, static_argnames=('w', 'options'))
    self._invert_traced_w = jax.jit(self._invert_program, static_argnames=('options',))

  def with_params(self, params: Any) -> 'Sampler':
    """The same sampler for other parameters of the same model, sharing its compilations."""
    other = copy.copy(self)
    other.params = params
    return other

  def with_batching(
    self, batch_size: int | None, progress: batching.Progress | None = None
  ) -> 'Sampler':
    """The same sampler with another batch size and progress, sharing its compilations."""
    other = copy.copy(self)
    other.batch_size, other.progress = batch_size, progress
    return other

  def options(
    self,
    solver: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    *,
    clip_x0: bool = True,
    start: int | None = None,
  ) -> Options:
    """Options with `config.sample`'s defaults filled in."""
    solver = solver or self.config.sample.sampler
    num_timesteps = self.config.diffusion.timesteps if start is None else start + 1
    eta = self.config.sample.eta if eta is None else float(eta)
    return Options(
      solver, default_steps(self.config, solver, steps, num_timesteps), eta, clip_x0, start
    )

  def noise(self, seed: int, num: int) -> np.ndarray:
    """[num, H, W, C] starting noise of `seed`; image i is normal(fold_in(noise key, i))."""
    key = seed_keys(seed)[0]
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), self.image_shape)
    return np.asarray(jax.vmap(draw)(jnp.arange(num)))

  def sample(
    self,
    attributes,
    *,
    seed: int = 0,
    guidance: Guidance = None,
    x_T: np.ndarray | None = None,
    solver: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    clip_x0: bool = True,
    start: int | None = None,
  ) -> np.ndarray:
    """[N, H, W, C] images in [-1, 1] for attributes [N, A].

    Image i starts from noise i of `seed`, or from x_T[i] when given (then `seed`
    only feeds per-step noise). `guidance` is a scale or one per image
    (default `config.sample.guidance`).
    """
    attributes = check_attributes(self.config, attributes)
    options = self.options(solver, steps, eta, clip_x0=clip_x0, start=start)
    x_T = self.noise(seed, len(attributes)) if x_T is None else np.asarray(x_T, np.float32)
    step_key = seed_keys(seed)[1]

    def run(b, x, a, w):
      rng = jax.random.fold_in(step_key, b)
      return self._call(
        self._sample_static_w, self._sample_traced_w, w, options, self._put(x), self._put(a), rng
      )

    return self._batched(run, x_T, attributes, guidance)

  def invert(
    self, images, attributes, *, steps: int, start: int, guidance: Guidance = 1.0
  ) -> np.ndarray:
    """Latents [N, H, W, C] at timestep `start` of images [N, H, W, C] by DDIM inversion.

    `sample(attributes, x_T=latents, solver='ddim', steps=steps, eta=0,
    clip_x0=False, start=start, guidance=guidance)` reconstructs the images, up to
    the discretisation error of `steps`.
    """
    attributes = check_attributes(self.config, attributes)
    options = Options('ddim', int(steps), start=start)

    def run(b, x, a, w):
      return self._call(
        self._invert_static_w, self._invert_traced_w, w, options, self._put(x), self._put(a)
      )

    return self._batched(run, np.asarray(images, np.float32), attributes, guidance)

  def guided_output(
    self,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    attributes: jax.Array,
    guidance: float | jax.Array,
  ) -> jax.Array:
    """One denoiser evaluation as every solver step makes it (`bench` counts its FLOPs)."""
    return diffusion.guided_output(
      self._model_fn(params), x, t, self._condition(attributes), guidance
    )

  def compiled(
    self, x_T: np.ndarray, attributes: np.ndarray, guidance: float, **options
  ) -> Callable[[], jax.Array]:
    """The whole sampling program for one batch, compiled now; returns a call that runs it.

    `bench` times the compilation and the calls.
    """
    options = self.options(**options)
    args = (self.params, self._put(x_T), self._put(attributes), jax.random.key(0))
    if self._plain_conditional(np.float32(guidance)):
      program = self._sample_static_w.lower(*args, w=1.0, options=options).compile()
      return lambda: program(*args)
    w = jnp.float32(guidance)
    program = self._sample_traced_w.lower(*args, w=w, options=options).compile()
    return lambda: program(*args, w=w)

  def _sample_program(self, params, x_T, attributes, rng, w, options):
    schedule = config_schedule(self.config, options.start)
    return diffusion.sample(
      self._model_fn(params),
      schedule,
      x_T,
      self._condition(attributes),
      rng,
      sampler=options.solver,
      steps=options.steps,
      guidance=w,
      eta=options.eta,
      prediction=self.config.diffusion.prediction,
      clip_x0=options.clip_x0,
    )

  def _invert_program(self, params, x0, attributes, w, options):
    schedule = config_schedule(self.config, options.start)
    return diffusion.ddim_invert(
      self._model_fn(params),
      schedule,
      x0,
      self._condition(attributes),
      steps=options.steps,
      guidance=w,
      prediction=self.config.diffusion.prediction,
    )

  def _model_fn(self, params):
    """model_fn(x, t, attributes) with `params` bound, as the diffusion core expects."""
    return lambda x, t, a: self.model.apply({'params': params}, x, t, a)

  def _condition(self, attributes):
    """The attributes, or None for an unconditional model (which takes no attribute input)."""
    return attributes if self.conditional else None

  def _plain_conditional(self, w: np.ndarray) -> bool:
    """Whether one model call per step serves: w == 1 everywhere, or no conditioning."""
    return not self.conditional or bool(np.all(w == 1.0))

  def _call(self, static_w, traced_w, w, options, *args):
    """Runs a program, with w static (plain conditional call) or traced (one compile for all w)."""
    if self._plain_conditional(w):
      return static_w(self.params, *args, w=1.0, options=options)
    return traced_w(self.params, *args, w=jnp.asarray(w, jnp.float32), options=options)

  def _batched(self, run, x, attributes, guidance):
    """run(batch index, x, attributes, w) over padded batches, with per-image guidance w."""
    w = self.config.sample.guidance if guidance is None else guidance
    w = np.broadcast_to(np.asarray(w, np.float32), (len(x),))
    if not np.all(np.isfinite(w)):
      raise UserError(f'guidance must be finite, got {w}')
    size = self.batch_size or min(len(x), DEFAULT_BATCH_SIZE)
    if len(x) < 1 or size < 1:
      raise UserError(
        f'need at least one image and a batch size of at least 1, got {len(x)} '
        f'images and batch size {size}'
      )
    return batching.map_batches(run, (x, attributes, w), size, self.progress)

  def _put(self, x):
    """x placed next to the parameters (one device, or replicated over a mesh)."""
    sharding = getattr(jax.tree.leaves(self.params)[0], 'sharding', None)
    return x if sharding is None else jax.device_put(x, sharding)


def print_progress(done: int, total: int) -> None:
  """A `progress` for command lines: one stderr line per batch when there are several."""
  if total > 1:
    print(f'batch {done}/{total} done', file=sys.stderr, flush=True)
