"""Sample, sweep guidance, interpolate attributes and edit photos with a trained model.

Every function takes the loaded `(config, model, params)` of
`checkpoints.load_model(workdir)` and returns numpy images in [-1, 1]
([..., H, W, C]), so notebooks and the `fdiff` CLI share them.

Noise is indexed by column: image i of seed K starts from
normal(fold_in(noise_key(K), i)), whatever the number of images, the batch
size, the attribute row or the guidance. So guidance-sweep rows share their
noise per column, and interpolation with seed K (image 0's noise of seed K)
starts and ends at `sample_images` with seed K. Deterministic samplers (DDIM
with eta=0, DPM-Solver++) then give equal images: bitwise at the same batch
size, to float rounding (~1e-5) otherwise, as XLA's kernels depend on shapes.
DDPM and DDIM with eta > 0 also draw per-step noise, from
fold_in(step_key(K), batch index).
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fdiff_jax import config_utils, diffusion, sampling
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError

DEFAULT_BATCH_SIZE = 32
EDIT_METHODS = ('inversion', 'sdedit')


def attribute_vector(config, text):
  """Parses `"Smiling,-Male"` against the model's vocabulary; errors name that vocabulary."""
  names = pipeline.attribute_names(config)
  try:
    vector = attributes_lib.parse_attributes(text, names)
  except UserError as e:
    raise UserError(f'{e} (this model knows the {len(names)} attributes of dataset '
                    f"'{config.data.dataset}')") from None
  return check_attributes(config, vector[None])[0]


def check_attributes(config, attributes):
  """float32 [N, A] attributes, checked against the model's vocabulary size and conditioning."""
  attributes = np.asarray(attributes, np.float32)
  names = pipeline.attribute_names(config)
  if attributes.ndim != 2 or attributes.shape[1] != len(names):
    raise UserError(f'attribute vectors of shape {attributes.shape} do not fit this model: it '
                    f"knows the {len(names)} attributes of dataset '{config.data.dataset}'")
  if not config.model.conditional and attributes.any():
    raise UserError('this model is unconditional (trained without attributes); '
                    'leave the attributes empty')
  return attributes


def updated_attributes(source, changes):
  """`source` [N, A] with the attributes that `changes` [A] names (non-zero) set to its values."""
  return np.where(changes != 0, changes, source).astype(np.float32)


def parse_guidance(text):
  """`"1,2,4"` -> [1.0, 2.0, 4.0]: the guidance scales w >= 0 of a sweep."""
  try:
    values = [float(item) for item in text.split(',')]
  except ValueError:
    raise UserError(f'guidance {text!r} is not a comma-separated list of numbers; '
                    'write e.g. --guidance 1,2,4') from None
  if not all(np.isfinite(w) and w >= 0 for w in values):
    raise UserError(f'guidance {text!r}: every w must be a finite number >= 0 '
                    '(0 unconditional, 1 plain conditional)')
  return values


def load_image(path, config):
  """A photo file -> float32 [H, W, C] in [-1, 1], preprocessed exactly like training data."""
  channels = pipeline.image_shape(config)[-1]
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB' if channels == 3 else 'L'))
  except (OSError, ValueError) as e:  # Missing, unreadable or not an image.
    raise UserError(f'cannot read image {path!r} ({e}); give a JPEG or PNG file') from None
  return pipeline.preprocess_image(array.reshape(array.shape[:2] + (channels,)), config)


def initial_noise(config, seed, num):
  """[num, H, W, C] starting noise of `seed`; column i is normal(fold_in(noise key, i))."""
  key = _seed_keys(seed)[0]
  shape = pipeline.image_shape(config)
  draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape)
  return np.asarray(jax.vmap(draw)(jnp.arange(num)))


def sample_images(config, model, params, attributes, *, seed=0, guidance=None, sampler=None,
                  steps=None, eta=None, batch_size=None):
  """[N, H, W, C] samples for attributes [N, A]; image i starts from noise column i of `seed`.

  Defaults come from `config.sample`. Batches are padded to `batch_size`, so the
  sampler compiles once per run (and is reused by later calls with the same shape).
  """
  attributes = check_attributes(config, attributes)
  return _sample(config, model, params, initial_noise(config, seed, len(attributes)), attributes,
                 seed=seed, guidance=guidance, batch_size=batch_size, sampler=sampler,
                 steps=steps, eta=eta)


def guidance_sweep(config, model, params, attributes, guidances, *, num, seed=0, **options):
  """[G, R, num, H, W, C]: `num` samples per attribute row [R, A] at each guidance w.

  Column n of every row and every w starts from the same noise, so rows differ
  only by attributes and w; the w = 1 rows are plain conditional sampling.
  `options` (sampler, steps, eta, batch_size) are those of `sample_images`.
  """
  attributes = check_attributes(config, attributes)
  x_T = np.tile(initial_noise(config, seed, num), (len(attributes), 1, 1, 1))
  rows = np.repeat(attributes, num, axis=0)
  samples = [_sample(config, model, params, x_T, rows, seed=seed, guidance=w, **options)
             for w in guidances]
  return np.stack(samples).reshape((len(guidances), len(attributes), num) + x_T.shape[1:])


def interpolate(config, model, params, start, end, *, frames, seeds, guidance=None,
                sampler=None, steps=None, eta=0.0, batch_size=None):
  """[S, F, H, W, C]: per seed, frames moving the attributes linearly from `start` to `end` [A].

  Every frame of a seed starts from that seed's noise column 0 and the sampler is
  deterministic, so only the attributes change along a row; frame 0 and frame
  F-1 are `sample_images` of `start` and `end` with that seed.
  """
  sampler = sampler or config.sample.sampler
  if sampler == 'ddpm' or (sampler == 'ddim' and eta > 0):
    raise UserError(f'interpolation needs a deterministic sampler (ddim with eta 0, or dpm++), '
                    f'got {sampler} with eta {eta}: fresh noise per step would change the face')
  if frames < 2 or not seeds:
    raise UserError(f'interpolation needs at least 2 frames and one seed, got {frames} frames '
                    f'and seeds {list(seeds)}')
  start, end = check_attributes(config, np.stack([start, end]))
  weights = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
  path = (1.0 - weights) * start + weights * end  # Exactly start and end at the ends.
  x_T = np.concatenate([np.repeat(initial_noise(config, s, 1), frames, axis=0) for s in seeds])
  out = _sample(config, model, params, x_T, np.tile(path, (len(seeds), 1)), seed=seeds[0],
                guidance=guidance, batch_size=batch_size, sampler=sampler, steps=steps, eta=eta)
  return out.reshape((len(seeds), frames) + x_T.shape[1:])


def invert(config, model, params, images, attributes, *, steps=None, guidance=None,
           batch_size=None):
  """Latents [N, H, W, C] at `sampling.inversion_start(config)` of images [N, H, W, C] by
  DDIM inversion under attributes [N, A].

  Sampling them back with DDIM (eta=0, no x0 clipping, the same start, steps,
  attributes and guidance) reconstructs the images, up to the discretisation
  error of `steps`.
  """
  attributes = check_attributes(config, attributes)
  invert_fn = _memoised(sampling.make_invert_fn, model, config,
                        **_inversion_grid(config, steps or config.sample.steps))
  w = _guidance(config, guidance, len(images))
  return _batched(lambda b, x, a, w: invert_fn(params, x, a, _static_if_one(w)),
                  (np.asarray(images, np.float32), attributes, w), batch_size)


def edit(config, model, params, images, source, target, *, method='inversion', strength=0.5,
         guidance=None, steps=None, seed=0, batch_size=None):
  """(reconstructions, edits), each [N, H, W, C], of images [N, H, W, C] in [-1, 1].

  'inversion': DDIM-invert under the source attributes [N, A] without guidance
  (w = 1: inverting a guided model drifts), sample back under the source at
  w = 1 (the reconstruction) and under the target at `guidance` (the edit).
  'sdedit': noise to timestep round(strength * T) with noise column i of `seed`
  and denoise with round(strength * steps) DDIM steps under source and target,
  both at `guidance`.
  """
  source, target = check_attributes(config, source), check_attributes(config, target)
  steps = steps or config.sample.steps
  n = len(source)
  edit_w = _guidance(config, guidance, n)
  if method == 'inversion':
    latents = invert(config, model, params, images, source, steps=steps, guidance=1.0,
                     batch_size=batch_size)
    options = dict(clip_x0=False, **_inversion_grid(config, steps))
    source_w = np.ones(n, np.float32)
  elif method == 'sdedit':
    (latents, options), source_w = _sdedit_start(config, images, strength, steps, seed), edit_w
  else:
    raise UserError(f'unknown edit method {method!r}; use one of {", ".join(EDIT_METHODS)}')
  out = _sample(config, model, params, np.concatenate([latents, latents]),
                np.concatenate([source, target]), seed=seed,
                guidance=np.concatenate([source_w, edit_w]), batch_size=batch_size,
                sampler='ddim', eta=0.0, **options)
  return out[:len(source)], out[len(source):]


def _inversion_grid(config, steps):
  """{steps, start} shared by DDIM inversion and sampling back: at most one step per timestep."""
  start = sampling.inversion_start(config)
  return dict(steps=min(steps, start + 1), start=start)


def predicted_attributes(config, images, classifier_dir):
  """Attributes [N, A] of images [N, H, W, C] read by the classifier trained in `classifier_dir`."""
  if not os.path.isdir(os.path.join(classifier_dir, 'checkpoints')):
    raise UserError(f'no trained attribute classifier in {classifier_dir!r}; give the photo\'s '
                    'attributes with --source "..." or train one with `fdiff train-classifier`')
  from fdiff_jax import classifier  # Lazy: only --source auto needs it.
  return check_attributes(config, classifier.predict_attributes(classifier_dir, images))


def _sdedit_start(config, images, strength, steps, seed):
  """(x_start ~ q(x_start | images), sampler options that denoise from timestep start)."""
  if not 0.0 < strength <= 1.0:
    raise UserError(f'sdedit strength must be in (0, 1], got {strength}')
  schedule = sampling.config_schedule(config)
  start = max(round(strength * schedule.num_timesteps), 1) - 1
  noise = initial_noise(config, seed, len(images))
  x_start = diffusion.q_sample(schedule, jnp.asarray(images, jnp.float32),
                               jnp.full((len(images),), start), noise)
  steps = min(max(round(strength * steps), 1), start + 1)
  return np.asarray(x_start), dict(steps=steps, start=start)


def _sample(config, model, params, x_T, attributes, *, seed, guidance=None, batch_size=None,
            **options):
  """Samples from the given starting noise; `options` go to `sampling.make_sample_fn`."""
  sample_fn = _memoised(sampling.make_sample_fn, model, config, **options)
  step_key = _seed_keys(seed)[1]
  w = _guidance(config, guidance, len(x_T))
  run = lambda b, x, a, w: sample_fn(params, x, a, jax.random.fold_in(step_key, b), _static_if_one(w))
  return _batched(run, (x_T, attributes, w), batch_size)


def _guidance(config, guidance, n):
  """Per-sample guidance [n] from a scalar or [n] array, `config.sample.guidance` by default."""
  w = config.sample.guidance if guidance is None else guidance
  return np.broadcast_to(np.asarray(w, np.float32), (n,)).copy()


def _static_if_one(w):
  """w == 1 everywhere -> the float 1.0, so the sampler skips the unconditional branch.

  Other scales stay a traced array: one compilation serves every w.
  """
  return 1.0 if np.all(w == 1.0) else w


def _seed_keys(seed):
  """(noise key, step key): independent streams for starting noise and per-step noise."""
  return jax.random.split(jax.random.key(seed))


def _batched(fn, arrays, batch_size):
  """Concatenated fn(batch index, *batches) over the leading axis, one line of progress per batch.

  Batches are padded to `batch_size` (default: n, at most DEFAULT_BATCH_SIZE), so `fn`
  sees one shape. An image's bits then depend on the batch shape, not on the other
  images in its batch.
  """
  n = len(arrays[0])
  if n < 1 or (batch_size is not None and batch_size < 1):
    raise UserError(f'need at least one image and a batch size of at least 1, got {n} images '
                    f'and batch size {batch_size}')
  size = batch_size or min(n, DEFAULT_BATCH_SIZE)
  count = -(-n // size)
  outputs = []
  for b in range(count):
    outputs.append(np.asarray(fn(b, *(_pad(a[b * size:(b + 1) * size], size) for a in arrays))))
    if count > 1:
      print(f'batch {b + 1}/{count} done', file=sys.stderr, flush=True)
  return np.concatenate(outputs)[:n]


def _pad(array, size):
  """Repeats the last row up to `size` rows."""
  return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def _memoised(factory, model, config, **options):
  """factory(model, config, **options), reused across calls so compilations are reused too."""
  return _cached(factory, model, config_utils.config_to_json(config),
                 tuple(sorted(options.items())))


@functools.lru_cache(maxsize=8)
def _cached(factory, model, config_json, options):
  """The memo behind `_memoised`, keyed by hashable stand-ins for config and options."""
  return factory(model, config_utils.config_from_json(config_json), **dict(options))
