"""Attribute-level generation on top of a `Sampler`: guidance sweeps, interpolation, edits.

Every function takes the `Sampler` of a trained model (see `sampler.py`, which
also defines how seeds become noise) and returns numpy images in [-1, 1]
([..., H, W, C]), so notebooks, the `fdiff` CLI and the demo share them.
Plain sampling is `Sampler.sample` itself.
"""

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from fdiff_jax import diffusion
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.sampler import Sampler, check_attributes, config_schedule, inversion_start

EDIT_METHODS = ('inversion', 'sdedit')


def attribute_vector(config, text: str) -> np.ndarray:
  """Parses `"Smiling,-Male"` against the model's vocabulary; errors name that vocabulary."""
  names = pipeline.attribute_names(config)
  try:
    vector = attributes_lib.parse_attributes(text, names)
  except UserError as e:
    raise UserError(
      f"{e} (this model knows the {len(names)} attributes of dataset '{config.data.dataset}')"
    ) from None
  return check_attributes(config, vector[None])[0]


def updated_attributes(source: np.ndarray, changes: np.ndarray) -> np.ndarray:
  """`source` [N, A] with the attributes that `changes` [A] names (non-zero) set to its values."""
  return np.where(changes != 0, changes, source).astype(np.float32)


def parse_guidance(text: str) -> list[float]:
  """`"1,2,4"` -> [1.0, 2.0, 4.0]: the guidance scales w >= 0 of a sweep."""
  try:
    values = [float(item) for item in text.split(',')]
  except ValueError:
    raise UserError(
      f'guidance {text!r} is not a comma-separated list of numbers such as 1,2,4'
    ) from None
  if not all(np.isfinite(w) and w >= 0 for w in values):
    raise UserError(
      f'guidance {text!r}: every w must be a finite number >= 0 '
      '(0 unconditional, 1 plain conditional)'
    )
  return values


def load_image(path: str, config) -> np.ndarray:
  """A photo file -> float32 [H, W, C] in [-1, 1], preprocessed exactly like training data."""
  size, _, channels = pipeline.image_shape(config)
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB' if channels == 3 else 'L'))
  except (OSError, ValueError, Image.DecompressionBombError) as e:  # Not an image, or huge.
    raise UserError(f'cannot read image {path!r} ({e}); give a JPEG or PNG file') from None
  if min(array.shape[:2]) < size:
    raise UserError(
      f'image {path!r} is {array.shape[1]}x{array.shape[0]} pixels, smaller than the '
      f"model's {size}x{size}; give a photo at least that large"
    )
  return pipeline.preprocess_image(array.reshape(array.shape[:2] + (channels,)), config)


def guidance_sweep(
  sampler: Sampler, attributes, guidances: Sequence[float], *, num: int, seed: int = 0, **options
) -> np.ndarray:
  """[G, R, num, H, W, C]: `num` samples per attribute row [R, A] at each guidance w.

  Column n of every row and every w starts from the same noise, so rows differ
  only by attributes and w; the w = 1 rows are plain conditional sampling.
  `options` (solver, steps, eta) are those of `Sampler.sample`.
  """
  attributes = check_attributes(sampler.config, attributes)
  x_T = np.tile(sampler.noise(seed, num), (len(attributes), 1, 1, 1))
  rows = np.repeat(attributes, num, axis=0)
  samples = [sampler.sample(rows, x_T=x_T, seed=seed, guidance=w, **options) for w in guidances]
  return np.stack(samples).reshape((len(guidances), len(attributes), num) + x_T.shape[1:])


def interpolate(
  sampler: Sampler,
  start: np.ndarray,
  end: np.ndarray,
  *,
  frames: int,
  seeds: Sequence[int],
  guidance: float | None = None,
  solver: str | None = None,
  steps: int | None = None,
) -> np.ndarray:
  """[S, F, H, W, C]: per seed, frames moving the attributes linearly from `start` to `end` [A].

  Every frame of a seed starts from that seed's noise 0 and the solver is
  deterministic (DDIM with eta 0, or DPM-Solver++), so only the attributes change
  along a row; frame 0 and frame F-1 are `sampler.sample` of `start` and `end`
  with that seed.
  """
  solver = solver or sampler.config.sample.sampler
  if solver == 'ddpm':
    raise UserError(
      'interpolation needs a deterministic sampler (ddim or dpm++), got ddpm: '
      'fresh noise per step would change the face'
    )
  if frames < 2 or not seeds:
    raise UserError(
      f'interpolation needs at least 2 frames and one seed, got {frames} frames '
      f'and seeds {list(seeds)}'
    )
  start, end = check_attributes(sampler.config, np.stack([start, end]))
  weights = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
  path = (1.0 - weights) * start + weights * end  # Exactly start and end at the ends.
  x_T = np.concatenate([np.repeat(sampler.noise(s, 1), frames, axis=0) for s in seeds])
  out = sampler.sample(
    np.tile(path, (len(seeds), 1)), x_T=x_T, guidance=guidance, solver=solver, steps=steps, eta=0.0
  )
  return out.reshape((len(seeds), frames) + x_T.shape[1:])


def inversion_grid(config, steps: int) -> dict:
  """{steps, start} shared by DDIM inversion and sampling back: at most one step per timestep.

  Inversion stops at `sampler.inversion_start`, before the near-singular end of the schedule.
  """
  start = inversion_start(config)
  return dict(steps=min(steps, start + 1), start=start)


def edit(
  sampler: Sampler,
  images,
  source,
  target,
  *,
  method: str = 'inversion',
  strength: float = 0.5,
  guidance: float | None = None,
  steps: int | None = None,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """(reconstructions, edits), each [N, H, W, C], of images [N, H, W, C] in [-1, 1].

  'inversion': DDIM-invert under the source attributes [N, A] without guidance
  (w = 1: inverting a guided model drifts), sample back under the source at
  w = 1 (the reconstruction) and under the target at `guidance` (the edit).
  'sdedit': noise to timestep round(strength * T) with noise i of `seed` and
  denoise with round(strength * steps) DDIM steps under source and target,
  both at `guidance`.
  """
  config = sampler.config
  source, target = check_attributes(config, source), check_attributes(config, target)
  images = np.asarray(images, np.float32)
  steps = steps or config.sample.steps
  n = len(source)
  edit_w = np.broadcast_to(
    np.float32(config.sample.guidance if guidance is None else guidance), (n,)
  )
  if method == 'inversion':
    grid = inversion_grid(config, steps)
    latents = sampler.invert(images, source, guidance=1.0, **grid)
    options, source_w = dict(clip_x0=False, **grid), np.ones(n, np.float32)
  elif method == 'sdedit':
    (latents, options), source_w = _sdedit_start(sampler, images, strength, steps, seed), edit_w
  else:
    raise UserError(f'unknown edit method {method!r}; use one of {", ".join(EDIT_METHODS)}')
  out = sampler.sample(
    np.concatenate([source, target]),
    x_T=np.concatenate([latents, latents]),
    seed=seed,
    guidance=np.concatenate([source_w, edit_w]),
    solver='ddim',
    eta=0.0,
    **options,
  )
  return out[:n], out[n:]


def edit_panel(sampler: Sampler, images, source, changes, **options) -> np.ndarray:
  """[N, 3, H, W, C]: original | reconstruction | edit of images [N, H, W, C].

  The edit sets the attributes that `changes` [A] names (non-zero) and keeps the
  rest of `source` [N, A]; `options` are those of `edit`.
  """
  images = np.asarray(images, np.float32)
  target = updated_attributes(source, changes)
  reconstruction, edited = edit(sampler, images, source, target, **options)
  return np.stack([images, reconstruction, edited], axis=1)


def classifier_dir(workdir: str, classifier: str | None = None) -> str:
  """Where the attribute classifier of a model is: `classifier` if given, else WORKDIR/classifier."""
  return classifier or os.path.join(workdir, 'classifier')


def has_classifier(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, 'checkpoints'))


def predicted_attributes(config, images: np.ndarray, classifier_dir: str) -> np.ndarray:
  """Attributes [N, A] of images [N, H, W, C] read by the classifier trained in `classifier_dir`."""
  if not has_classifier(classifier_dir):
    raise UserError(
      f"no trained attribute classifier in {classifier_dir!r}; give the photo's "
      'attributes with --source "..." or train one with `fdiff train-classifier`'
    )
  from fdiff_jax import classifier  # Lazy: only --source auto needs it.

  return check_attributes(config, classifier.predict_attributes(classifier_dir, images))


def _sdedit_start(sampler, images, strength, steps, seed):
  """(x_start ~ q(x_start | images), sampling options that denoise from timestep start)."""
  if not 0.0 < strength <= 1.0:
    raise UserError(f'sdedit strength must be in (0, 1], got {strength}')
  schedule = config_schedule(sampler.config)
  start = max(round(strength * schedule.num_timesteps), 1) - 1
  noise = sampler.noise(seed, len(images))
  x_start = diffusion.q_sample(
    schedule, jnp.asarray(images), jnp.full((len(images),), start), noise
  )
  steps = min(max(round(strength * steps), 1), start + 1)
  return np.asarray(x_start), dict(steps=steps, start=start)
