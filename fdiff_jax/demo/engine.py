"""What the demo computes, with no UI: controls' values in, uint8 images out.

Sampling, interpolation and edits go through `fdiff_jax.generate`, exactly as the
`fdiff` CLI does; this module only turns the page's values (tri-state attribute
controls, numbers typed by hand) into their arguments, checks them (a UserError
per mistake) and buckets batch sizes so that a few compiled programs serve every
request the page can make.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fdiff_jax import checkpoints, generate, images
from fdiff_jax.data import celeba, digits, pipeline
from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES, DIGIT_ATTRIBUTES
from fdiff_jax.data.synth_celeba import RENDERED_ATTRIBUTES
from fdiff_jax.errors import UserError
from fdiff_jax.sampler import Sampler

PRETRAINED = os.path.join('pretrained', 'synth-faces')
BATCH_BUCKETS = (1, 2, 4, 8)  # Compiled batch sizes; requests are padded up to one of them.
MAX_IMAGES = BATCH_BUCKETS[-1]
MAX_FRAMES = 16
MAX_STEPS = 200
MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1
SOLVERS = ('dpm++', 'ddim', 'ddpm')
DETERMINISTIC_SOLVERS = ('dpm++', 'ddim')
EDIT_METHODS = generate.EDIT_METHODS
STATES = {'any': 0, 'yes': 1, 'no': -1}  # A tri-state control: unspecified, present, absent.
DISPLAY_SIZE = 128  # Images are enlarged (nearest) to at least this many pixels a side.

# CelebA's 40 attributes as the page groups them.
ATTRIBUTE_GROUPS = (
  (
    'Person',
    (
      'Male',
      'Young',
      'Attractive',
      'Chubby',
      'Double_Chin',
      'Oval_Face',
      'High_Cheekbones',
      'Pale_Skin',
      'Rosy_Cheeks',
    ),
  ),
  (
    'Hair',
    (
      'Bald',
      'Black_Hair',
      'Blond_Hair',
      'Brown_Hair',
      'Gray_Hair',
      'Bangs',
      'Receding_Hairline',
      'Straight_Hair',
      'Wavy_Hair',
    ),
  ),
  ('Facial hair', ('No_Beard', 'Mustache', 'Goatee', '5_o_Clock_Shadow', 'Sideburns')),
  ('Expression', ('Smiling', 'Mouth_Slightly_Open')),
  (
    'Eyes, nose and lips',
    (
      'Arched_Eyebrows',
      'Bushy_Eyebrows',
      'Bags_Under_Eyes',
      'Narrow_Eyes',
      'Big_Nose',
      'Pointy_Nose',
      'Big_Lips',
    ),
  ),
  (
    'Accessories and makeup',
    (
      'Eyeglasses',
      'Wearing_Hat',
      'Wearing_Earrings',
      'Wearing_Necklace',
      'Wearing_Necktie',
      'Wearing_Lipstick',
      'Heavy_Makeup',
    ),
  ),
  ('Photo', ('Blurry',)),
)


def resolve_workdir(workdir: str | None) -> str:
  """`workdir`, else pretrained/synth-faces under the current dir or the repository root."""
  if workdir:
    return workdir
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for base in dict.fromkeys((os.getcwd(), root)):
    if os.path.isdir(os.path.join(base, PRETRAINED)):
      return os.path.join(base, PRETRAINED)
  raise UserError(
    f'no --workdir given and no {PRETRAINED} in {os.getcwd()} or {root}; give --workdir '
    'of a trained model (or of one written by `fdiff export`)'
  )


def check_classifier(classifier: str | None, workdir: str | None = None) -> str | None:
  """The classifier workdir that reads photos' attributes, or None if there is none.

  `classifier` (--classifier) must be a classifier workdir with checkpoints, else
  a UserError; without it, the model's own WORKDIR/classifier if it has one.
  """
  if classifier and not generate.has_classifier(classifier):
    raise UserError(
      f'no trained attribute classifier in {classifier!r} (--classifier); train one with '
      '`fdiff train-classifier` or leave --classifier out'
    )
  if classifier or not workdir:
    return classifier
  own = generate.classifier_dir(workdir)
  return own if generate.has_classifier(own) else None


def enable_compilation_cache(cache_dir: str) -> None:
  """Keeps compiled XLA programs in `cache_dir`, so a restart loads them instead of compiling."""
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def attribute_groups(names: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
  """(title, names) to show together: CelebA names by ATTRIBUTE_GROUPS, digits as one group."""
  groups = [(title, tuple(n for n in members if n in names)) for title, members in ATTRIBUTE_GROUPS]
  grouped = {n for _, members in groups for n in members}
  rest = tuple(n for n in names if n not in grouped)
  if rest:
    groups.append(('Digit' if set(rest) <= set(DIGIT_ATTRIBUTES) else 'Other', rest))
  return [(title, members) for title, members in groups if members]


@dataclasses.dataclass(frozen=True)
class Labels:
  """Real attribute labels of the model's dataset, when its files are here."""

  all_rows: np.ndarray | None  # [N, A] +-1, every split
  eval_rows: np.ndarray | None  # [M, A] +-1, config.data.eval_split
  source: str  # Where they come from, or why there are none.


def real_labels(config) -> Labels:
  """The labels of digits (scikit-learn) or of CelebA files in data.manual_dir; else none."""
  dataset, split = config.data.dataset, config.data.eval_split
  if dataset == 'digits':
    from sklearn import datasets  # Lazy: only digits models need it.

    target = datasets.load_digits().target
    rows = np.where(np.arange(10)[None] == target[:, None], 1, -1).astype(np.float32)
    in_split = digits.split_of_each_image(target) == split
    return Labels(rows, rows[in_split], f'the {split} digits of scikit-learn')
  if dataset == 'celeba':
    try:
      paths = celeba.locate_files(config.data.manual_dir)
      table = celeba.read_attributes(paths.attributes)
      partition = celeba.read_partition(paths.partition)
    except (UserError, OSError):
      return Labels(None, None, f"no CelebA files in data.manual_dir '{config.data.manual_dir}'")
    rows = {name: np.asarray(values, np.float32) for name, values in table.items()}
    eval_rows = [rows[name] for name, part in partition.items() if part == split and name in rows]
    return Labels(
      np.stack(list(rows.values())),
      np.stack(eval_rows) if eval_rows else None,
      f'the {split} faces in {config.data.manual_dir}',
    )
  return Labels(None, None, f"the demo reads labels of digits and celeba, not of '{dataset}'")


def known_attributes(config, labels: Labels) -> tuple[tuple[str, ...], str]:
  """The attributes the model was trained to control, and how that was decided.

  Those that are present in some training labels and absent in others; without
  labels, a CelebA model whose data.manual_dir names a synthetic CelebA knows the
  attributes it draws (`RENDERED_ATTRIBUTES`), any other model all of its vocabulary.
  """
  names = pipeline.attribute_names(config)
  if not config.model.conditional:
    return (), 'the model is unconditional'
  if labels.all_rows is not None:
    varies = (labels.all_rows > 0).any(0) & (labels.all_rows < 0).any(0)
    known = tuple(n for n, v in zip(names, varies) if v)
    return known, f'the {len(known)} attributes that vary in the labels of {config.data.manual_dir}'
  folder = os.path.basename(os.path.normpath(config.data.manual_dir or '.')).lower()
  if names == CELEBA_ATTRIBUTES and 'synth' in folder:
    known = tuple(n for n in names if n in RENDERED_ATTRIBUTES)
    return known, f'the {len(known)} attributes a synthetic CelebA draws'
  return names, f"all {len(names)} attributes of dataset '{config.data.dataset}'"


def whole_number(value, what: str, low: int, high: int) -> int:
  """`value` (a number or text typed in the page) as an int in [low, high], or a UserError."""
  number = _number(value, what, f'a whole number from {low} to {high}')
  if not (number.is_integer() and low <= number <= high):
    raise UserError(f'{what} must be a whole number from {low} to {high}, got {value!r}')
  return int(number)


def real_number(value, what: str, low: float, high: float) -> float:
  """`value` as a float in [low, high], or a UserError."""
  number = _number(value, what, f'a number from {low:g} to {high:g}')
  if not low <= number <= high:
    raise UserError(f'{what} must be a number from {low:g} to {high:g}, got {value!r}')
  return number


def choice(value, what: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise UserError(f'{what} must be one of {", ".join(choices)}, got {value!r}')
  return value


def _number(value, what, expected):
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise UserError(f'{what} must be {expected}, got {value!r}') from None
  if not np.isfinite(number):
    raise UserError(f'{what} must be {expected}, got {value!r}')
  return number


def bucket(n: int) -> int:
  """The compiled batch size that serves n images: the smallest bucket >= n, else the largest."""
  return next((b for b in BATCH_BUCKETS if b >= n), BATCH_BUCKETS[-1])


Progress = Callable[[int, int], None] | None


class DemoEngine:
  """One loaded model and what the page asks of it.

  Attribute settings are lists of 'any' | 'yes' | 'no', one per `known` attribute.
  Numbers arrive as the page sends them and are checked here.
  """

  def __init__(self, workdir: str, classifier: str | None = None):
    loaded = checkpoints.load_model(workdir)
    self.workdir, self.step, self.config = workdir, loaded.step, loaded.config
    self.sampler = Sampler(loaded.config, loaded.model, loaded.params)
    self.classifier = check_classifier(classifier, workdir)
    self.labels = real_labels(self.config)
    self.known, self.known_source = known_attributes(self.config, self.labels)
    self.groups = attribute_groups(self.known)
    self.image_shape = self.sampler.image_shape
    self.scale = max(1, -(-DISPLAY_SIZE // self.image_shape[0]))
    sample = self.config.sample
    self.defaults = dict(
      guidance=float(sample.guidance),
      solver=sample.sampler if sample.sampler in SOLVERS else SOLVERS[0],
      steps=int(sample.steps),
      seed=0,
      num=4,
      frames=8,
      method='inversion',
      strength=0.5,
    )

  # Attribute settings.

  def attribute_text(self, states: Sequence[str]) -> str:
    """Tri-state settings -> the CLI's attribute syntax, e.g. "Smiling,-Male"."""
    if len(states) != len(self.known):
      raise UserError(f'expected {len(self.known)} attribute settings, got {len(states)}')
    items = []
    for name, state in zip(self.known, states):
      value = STATES[choice(state, name, tuple(STATES))]
      if value:
        items.append(name if value > 0 else f'-{name}')
    return ','.join(items)

  def vector(self, states: Sequence[str]) -> np.ndarray:
    """Tri-state settings -> the model's attribute vector [A]."""
    return generate.attribute_vector(self.config, self.attribute_text(states))

  def states(self, vector: np.ndarray) -> list[str]:
    """An attribute vector [A] -> tri-state settings of the known attributes (by sign)."""
    names = pipeline.attribute_names(self.config)
    values = [vector[names.index(name)] for name in self.known]
    return ['yes' if v > 0 else 'no' if v < 0 else 'any' for v in values]

  def random_real(self, rng: np.random.Generator) -> list[str]:
    """The settings of a random example of the evaluation split."""
    rows = self.labels.eval_rows
    if rows is None:
      raise UserError(f'no real attribute combinations: {self.labels.source}')
    return self.states(rows[rng.integers(len(rows))])

  # Generation.

  def sample(
    self, states, *, num, guidance, solver, steps, seed, progress: Progress = None
  ) -> np.ndarray:
    """A uint8 row of `num` samples of the settings (image i from noise i of `seed`)."""
    num = whole_number(num, 'number of images', 1, MAX_IMAGES)
    options = self._options(guidance, solver, steps, seed, SOLVERS)
    seed = options.pop('seed')
    rows = generate.guidance_sweep(
      self.sampler.with_batching(bucket(num), progress),
      self.vector(states)[None],
      [options.pop('guidance')],
      num=num,
      seed=seed,
      **options,
    )
    return self.enlarge(images.grid_image(rows[0]))

  def interpolate(
    self, start, end, *, frames, guidance, solver, steps, seed, progress: Progress = None
  ) -> np.ndarray:
    """[1, F, H, W, C] in [-1, 1]: frames moving the settings from `start` to `end`."""
    frames = whole_number(frames, 'frames', 2, MAX_FRAMES)
    options = self._options(guidance, solver, steps, seed, DETERMINISTIC_SOLVERS)
    return generate.interpolate(
      self.sampler.with_batching(bucket(frames), progress),
      self.vector(start),
      self.vector(end),
      frames=frames,
      seeds=[options.pop('seed')],
      **options,
    )

  def load_photo(self, path) -> np.ndarray:
    """[1, H, W, C] in [-1, 1]: an uploaded photo, preprocessed like the training data."""
    if not path:
      raise UserError('upload a photo first (a JPEG or PNG file)')
    return generate.load_image(str(path), self.config)[None]

  def read_attributes(self, path) -> list[str]:
    """The settings of a photo as the classifier (`check_classifier`) reads it."""
    if not self.classifier:
      raise UserError(
        'no classifier: start the demo with --classifier DIR (or train one in '
        f'{generate.classifier_dir(self.workdir)}) to read attributes'
      )
    vector = generate.predicted_attributes(self.config, self.load_photo(path), self.classifier)
    return self.states(vector[0])

  def edit(
    self,
    photo: np.ndarray,
    source,
    changes,
    *,
    method,
    strength,
    guidance,
    steps,
    seed,
    progress: Progress = None,
  ) -> np.ndarray:
    """uint8 original | reconstruction | edit of a photo [1, H, W, C] (see `generate.edit`)."""
    options = self._options(guidance, 'ddim', steps, seed, ('ddim',))
    del options['solver']  # Edits always run DDIM.
    panel = generate.edit_panel(
      self.sampler.with_batching(None, progress),
      photo,
      self.vector(source)[None],
      self.vector(changes),
      method=choice(method, 'edit method', EDIT_METHODS),
      strength=real_number(strength, 'strength', 0.0, 1.0),
      **options,
    )
    return self.enlarge(images.grid_image(panel))

  def enlarge(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> [H * scale, W * scale, 3], nearest, for display."""
    image = np.repeat(np.repeat(image, self.scale, axis=0), self.scale, axis=1)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image

  def warm_up(self, report: Callable[[str], None] = print) -> float:
    """Compiles what the page's default settings run, for every batch bucket; returns seconds.

    Interpolation with the default solver and steps reuses the sampling programs.
    """
    d, start = self.defaults, time.perf_counter()
    nothing = ['any'] * len(self.known)
    options = dict(guidance=d['guidance'], steps=d['steps'], seed=0)
    jobs = [
      (
        f'sampling, batch of {b}',
        lambda b=b: self.sample(nothing, num=b, solver=d['solver'], **options),
      )
      for b in BATCH_BUCKETS
    ]
    photo = np.zeros((1,) + self.image_shape, np.float32)
    for method in EDIT_METHODS:
      jobs.append(
        (
          f'{method} edit',
          lambda m=method: self.edit(
            photo, nothing, nothing, method=m, strength=d['strength'], **options
          ),
        )
      )
    for i, (what, job) in enumerate(jobs, 1):
      report(f'compiling {i}/{len(jobs)}: {what}')
      job()
    return time.perf_counter() - start

  def _options(self, guidance, solver, steps, seed, solvers):
    return dict(
      guidance=real_number(guidance, 'guidance w', 0.0, MAX_GUIDANCE),
      solver=choice(solver, 'sampler', solvers),
      steps=whole_number(steps, 'steps', 1, MAX_STEPS),
      seed=whole_number(seed, 'seed', 0, MAX_SEED),
    )
