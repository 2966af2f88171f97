"""`fdiff evaluate`: FID, classifier Frechet distance and attribute control vs guidance.

For every workdir and guidance scale it samples N images conditioned on
attribute vectors of real validation images (realistic combinations), N on
single-attribute prompts ("Smiling", "-Male", ...; only that attribute is
specified) and N on each of 2- and 3-attribute prompts (attributes picked
from the vectors of real training images, so the combinations occur in the
training data), then reports:
  * FID (FID Inception pool features) and the classifier Frechet distance
    (the attribute classifier's penultimate features) of the realistic
    samples against the whole validation split, both uint8 round-tripped;
  * attribute-control accuracy: how often the classifier reads back each
    specified attribute, with its accuracy on real validation images as the
    ceiling;
  * joint accuracy of the 2- and 3-attribute prompts: the fraction of samples
    with every specified attribute read back, with the classifier's joint
    accuracy on validation images matching each prompt as the ceiling;
  * unspecified attributes against the data: per single or combined prompt,
    the rate of each unspecified attribute in the samples against its rate in
    the training images that match the prompt (P(Male | Mustache)), and the
    mean absolute gap; prompts matched by too few training images are skipped;
  * interpolation: strips made by `generate.interpolate` (as `fdiff
    interpolate`) moving one attribute from absent to present, the rest
    unspecified: the fraction of frames whose other attributes read as in the
    first frame, and of strips whose moved attribute changes reading once;
  * sample count and wall time.
An unconditional workdir ignores attributes and guidance: it is sampled once
and reported with guidance null, the baseline the conditional runs beat; the
joint, unspecified and interpolation metrics are null for it, and for one-hot
datasets (digits), where an image has one class and nothing to combine.
Writes report.json, report.md and report.png.
"""

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from fdiff_jax import checkpoints, generate, images
from fdiff_jax import classifier as classifier_lib
from fdiff_jax.batching import map_batches
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline, sources
from fdiff_jax.errors import UserError
from fdiff_jax.metrics import fid, inception, plot
from fdiff_jax.sampler import Sampler

CACHE_DIR = 'eval_cache'
COMBINED_SIZES = (2, 3)  # Attributes per combined prompt.


def uint8_round_trip(x):
  """[-1, 1] -> uint8 -> [-1, 1]: real and generated images quantized alike."""
  return images.to_uint8(x).astype(np.float32) / 127.5 - 1.0


def cached(path, key, compute):
  """Arrays saved at `path` for `key`, else compute() (a dict of arrays), saved and returned."""
  if os.path.isfile(path):
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) == key:
        return {k: f[k] for k in f.files if k != 'key'}
  arrays = compute()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + '.tmp.npz', key=key, **arrays)
  os.replace(path + '.tmp.npz', path)
  return arrays


def _cache_path(workdir, kind, key):
  return os.path.join(
    workdir, CACHE_DIR, f'{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz'
  )


def _data_key(config):
  d = config.data
  return f'{d.dataset}|{d.manual_dir}|{d.eval_split}|{d.image_size}'


def classifier_reference(workdir, config, clf, batch_size):
  """Classifier outputs on the real validation split: features' Gaussian and predictions."""
  key = f'classifier|{os.path.abspath(clf.workdir)}|{clf.step}|{_data_key(config)}'

  def compute():
    predicted, targets, stats = clf.run_on_split(
      config, transform=uint8_round_trip, batch_size=batch_size
    )
    mu, sigma = stats.mean_and_covariance()
    return {'mu': mu, 'sigma': sigma, 'predicted': predicted, 'targets': targets}

  return cached(_cache_path(workdir, 'classifier', key), key, compute)


def train_labels(workdir, config):
  """+-1 attributes [N, A] of the training split, read without decoding images, computed once."""
  d = config.data
  key = f'train_labels|{d.dataset}|{d.manual_dir}|{d.train_split}'

  def compute():
    split = sources.open_split(config, d.train_split)
    return {'labels': np.stack([split[i][1] for i in range(len(split))])}

  return cached(_cache_path(workdir, 'train_labels', key), key, compute)['labels']


def inception_reference(workdir, config, feature_fn, weights_id, batch_size):
  """FID Inception features' Gaussian of the real validation split, computed once."""
  key = f'inception|{weights_id}|{_data_key(config)}'

  def compute():
    stats = fid.FeatureStatistics()
    for batch in pipeline.create_eval_iterator(config, batch_size=batch_size):
      if len(batch['image']):
        stats.update(_features(feature_fn, uint8_round_trip(batch['image']), batch_size))
    mu, sigma = stats.mean_and_covariance()
    return {'mu': mu, 'sigma': sigma, 'count': np.int64(stats.count)}

  return cached(_cache_path(workdir, 'inception', key), key, compute)


def informative_attributes(targets, one_hot):
  """Attributes scored for control: present in some and absent in other validation images."""
  if one_hot:
    return (targets > 0).any(0)
  return (targets > 0).any(0) & (targets < 0).any(0)


def conditioning(targets, names, informative, one_hot, num_samples, seed):
  """(realistic vectors [N, A] of random validation images, single-attribute prompt vectors).

  Every prompt gets ceil(N / prompts) samples, so each attribute is scored.
  """
  rng = np.random.default_rng(seed)
  realistic = targets[rng.choice(len(targets), num_samples, replace=len(targets) < num_samples)]
  prompts = [
    p
    for i, name in enumerate(names)
    if informative[i]
    for p in ((name,) if one_hot else (name, f'-{name}'))
  ]
  single = np.stack([attributes_lib.parse_attributes(p, names) for p in prompts])
  return realistic.astype(np.float32), _repeat(single, num_samples)


def _repeat(prompts, num_samples):
  """Each prompt ceil(N / prompts) times, in order."""
  return np.repeat(prompts, -(-num_samples // len(prompts)), axis=0)


def combined_prompts(labels, informative, size, num_prompts, seed):
  """[num_prompts, A]: `size` informative attributes of random rows of `labels`, the rest 0.

  Each prompt keeps the values of one real vector, so the combination occurs in `labels`.
  A vector's present and absent attributes are equally likely to be picked (CelebA's
  vectors are mostly absences). None if fewer than `size` attributes are informative.
  """
  candidates = np.flatnonzero(informative)
  if len(candidates) < size:
    return None
  rng = np.random.default_rng([seed, size])
  rows = rng.choice(len(labels), num_prompts, replace=len(labels) < num_prompts)
  prompts = np.zeros((num_prompts, labels.shape[1]), np.float32)
  for prompt, values in zip(prompts, labels[rows][:, candidates]):
    present, absent = values > 0, values < 0
    weights = present / max(present.sum(), 1) + absent / max(absent.sum(), 1)
    picked = rng.choice(len(candidates), size, replace=False, p=weights / weights.sum())
    prompt[candidates[picked]] = values[picked]
  return prompts


def strip_attributes(informative, num_strips, seed):
  """Attribute index interpolated by each strip: informative attributes in a seeded order."""
  order = np.random.default_rng(seed).permutation(np.flatnonzero(informative))
  return order[np.arange(num_strips) % len(order)] if len(order) else order[:0]


def matching(labels, prompt):
  """[N] bool: rows of `labels` [N, A] with every specified attribute of `prompt` [A]."""
  return ((labels == np.sign(prompt)) | (prompt == 0)).all(1)


def joint_accuracy(predicted, vectors, informative):
  """Fraction of rows whose every specified informative attribute is read back.

  `predicted` and `vectors` are [N, A]; rows that specify no informative attribute do not count.
  None if no row counts.
  """
  specified = (vectors != 0) & informative[None]
  satisfied = ((predicted == np.sign(vectors)) | ~specified).all(1)
  counted = specified.any(1)
  return float(satisfied[counted].mean()) if counted.any() else None


def joint_ceiling(predicted, targets, prompts, informative):
  """Mean over `prompts` of the classifier's joint accuracy on the real images matching each.

  `predicted` and `targets` [N, A] are the classifier's readings and the labels of real
  images; prompts that no image matches do not count.
  """
  values = [
    joint_accuracy(predicted[m], np.broadcast_to(p, (m.sum(), len(p))), informative)
    for p in prompts
    if (m := matching(targets, p)).any()
  ]
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def unspecified_rates(predicted, vectors, labels, informative, names, min_support):
  """Rates of unspecified attributes in samples vs in the training images matching the prompt.

  `predicted` [N, A] are the classifier's readings of samples of `vectors` [N, A];
  each distinct row of `vectors` is a prompt. For every prompt matched by at
  least `min_support` rows of the training `labels` [M, A], and every
  informative attribute it leaves unspecified, the fraction of its samples read
  as present ('sampled') and of the matching training images labelled present
  ('train'). Prompts with fewer matches are skipped rather than reported as noise.
  """
  prompts, which = np.unique(vectors, axis=0, return_inverse=True)
  which = which.reshape(-1)
  report, gaps, skipped = {}, [], 0
  for i, prompt in enumerate(prompts):
    free = informative & (prompt == 0)
    if not free.any():
      continue
    match = matching(labels, prompt)
    if match.sum() < min_support:
      skipped += 1
      continue
    sampled = (predicted[which == i][:, free] > 0).mean(0)
    train = (labels[match][:, free] > 0).mean(0)
    gaps.extend(np.abs(sampled - train))
    report[_prompt_text(prompt, names)] = {
      'samples': int((which == i).sum()),
      'train_support': int(match.sum()),
      'mean_abs_gap': float(np.abs(sampled - train).mean()),
      'rates': {
        name: {'sampled': float(s), 'train': float(t)}
        for name, s, t in zip(np.asarray(names)[free], sampled, train)
      },
    }
  return {
    'mean_abs_gap': float(np.mean(gaps)) if gaps else None,
    'min_train_support': min_support,
    'num_prompts': len(report),
    'skipped_prompts': skipped,
    'prompts': report,
  }


def identity_kept(readings, moved, informative):
  """Fraction of frames after the first whose other informative attributes read as in the first.

  `readings` [S, F, A] are the classifier's +-1 readings of S strips of F frames;
  strip s interpolates attribute `moved[s]`.
  """
  others = informative[None] & (np.arange(readings.shape[-1])[None] != np.asarray(moved)[:, None])
  kept = (readings[:, 1:] == readings[:, :1]) | ~others[:, None]
  return float(kept.all(-1).mean())


def single_flip(readings):
  """Fraction of strips [S, F] of +-1 readings that go from absent to present in one change."""
  changes = (np.diff(readings, axis=1) != 0).sum(1)
  return float(((readings[:, 0] < 0) & (readings[:, -1] > 0) & (changes == 1)).mean())


def _prompt_text(prompt, names):
  """[A] +-1/0 -> "Smiling,-Male"."""
  return ','.join(('' if v > 0 else '-') + n for n, v in zip(names, prompt) if v != 0)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every run is evaluated with."""

  num_samples: int
  sampler: str
  steps: int | None
  guidance: list
  seed: int
  batch_size: int
  interp_strips: int
  interp_frames: int
  min_train_support: int


@dataclasses.dataclass
class Run:
  """A workdir ready to evaluate: its sampler, conditioning vectors and real-data references."""

  workdir: str
  name: str
  step: int
  sampler: Sampler
  classifier_ref: tuple
  informative: np.ndarray
  realistic: np.ndarray
  single: np.ndarray
  ceiling: dict
  reference_count: int
  inception_ref: tuple | None = None
  # Joint, unspecified and interpolation metrics; empty or None where they do not apply.
  combined: dict = dataclasses.field(default_factory=dict)  # {size: [~N, A] prompts}
  joint_ceiling: dict | None = None
  train_labels: np.ndarray | None = None
  strip_attributes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
  strip_sampler: Sampler | None = None

  @property
  def config(self):
    return self.sampler.config


def _accuracy(predicted, vectors, informative, clf):
  mask = classifier_lib.scored(vectors, clf.one_hot) & informative[None]
  mean, per_attribute = classifier_lib.accuracy(predicted, vectors, mask, clf.attribute_names)
  return {'mean': mean, 'per_attribute': per_attribute, 'num_samples': len(vectors)}


def _sample_and_classify(run, clf, vectors, guidance, settings):
  """Uint8 round-tripped samples for `vectors`, with the classifier's (predictions, features).

  Image i starts from noise i of the seed, for the realistic and the single-prompt
  vectors alike. An unconditional model samples from all-zero attributes.
  """
  if not run.sampler.conditional:  # The baseline ignores attributes; it is scored all the same.
    vectors = np.zeros_like(vectors)
  samples = uint8_round_trip(
    run.sampler.sample(
      vectors, seed=settings.seed, guidance=guidance, solver=settings.sampler, steps=settings.steps
    )
  )
  return (samples, *clf(samples, settings.batch_size))


def evaluate_point(run, clf, feature_fn, guidance, settings, out_dir):
  """All metrics of one (workdir, guidance): a report row."""
  start = time.perf_counter()
  w = 1.0 if guidance is None else guidance
  samples, predicted, features = _sample_and_classify(run, clf, run.realistic, w, settings)
  _, single_predicted, _ = _sample_and_classify(run, clf, run.single, w, settings)
  row = {
    'guidance': guidance,
    'num_samples': len(samples),
    'classifier_fd': fid.frechet_distance(*fid.statistics(features)[:2], *run.classifier_ref),
    'fid': None,
    'attribute_accuracy': _accuracy(predicted, run.realistic, run.informative, clf),
    'single_attribute_accuracy': _accuracy(single_predicted, run.single, run.informative, clf),
    'joint_accuracy': None,
    'unspecified_attributes': None,
    'interpolation': None,
  }
  if feature_fn is not None:
    sample_stats = fid.statistics(_features(feature_fn, samples, settings.batch_size))
    row['fid'] = fid.frechet_distance(*sample_stats[:2], *run.inception_ref)
  name = 'uncond' if guidance is None else f'w{guidance:g}'
  if run.combined:
    combined = {
      k: _sample_and_classify(run, clf, v, w, settings)[1] for k, v in run.combined.items()
    }
    row['joint_accuracy'] = {
      str(k): joint_accuracy(combined[k], run.combined[k], run.informative)
      if k in combined
      else None
      for k in COMBINED_SIZES
    }
    row['unspecified_attributes'] = unspecified_rates(
      np.concatenate([single_predicted, *combined.values()]),
      np.concatenate([run.single, *run.combined.values()]),
      run.train_labels,
      run.informative,
      clf.attribute_names,
      settings.min_train_support,
    )
  if len(run.strip_attributes):
    frames, readings = _interpolation_strips(run, clf, w, settings)
    row['interpolation'] = {
      'identity_kept': identity_kept(readings, run.strip_attributes, run.informative),
      'single_flip': single_flip(readings[np.arange(len(readings)), :, run.strip_attributes]),
      'strips': len(readings),
      'frames': settings.interp_frames,
      'attributes': [clf.attribute_names[a] for a in run.strip_attributes],
    }
    _save_grid(
      frames, len(frames), os.path.join(out_dir, 'samples', f'{run.name}_{name}_interp.png')
    )
  row['wall_time_s'] = time.perf_counter() - start
  _save_grid(
    samples[:64],
    int(np.ceil(min(len(samples), 64) ** 0.5)),
    os.path.join(out_dir, 'samples', f'{run.name}_{name}.png'),
  )
  return row


def _interpolation_strips(run, clf, guidance, settings):
  """(frames [S * F, H, W, C], classifier readings [S, F, A]) of the interpolation strips.

  Strip s moves attribute run.strip_attributes[s] from -1 to +1, the others
  unspecified, starting from image 0 of seed `settings.seed + s`.
  """
  frames = []
  for s, attribute in enumerate(run.strip_attributes):
    end = np.zeros(len(clf.attribute_names), np.float32)
    end[attribute] = 1.0
    strip = generate.interpolate(
      run.strip_sampler,
      -end,
      end,
      frames=settings.interp_frames,
      seeds=[settings.seed + s],
      guidance=guidance,
      solver=settings.sampler,
      steps=settings.steps,
    )
    frames.append(uint8_round_trip(strip[0]))
  frames = np.concatenate(frames)
  readings = clf(frames, settings.batch_size)[0]
  return frames, readings.reshape((len(run.strip_attributes), settings.interp_frames, -1))


def _save_grid(samples, rows, path):
  grid = images.make_grid(images.to_uint8(samples), rows=rows)
  images.save_png(path, grid, scale=max(1, 512 // max(grid.shape[:2])))


def _features(feature_fn, images_, batch_size):
  """FID Inception features of many images, in fixed-size batches."""
  return map_batches(lambda _, x: feature_fn(x), (images_,), min(batch_size, len(images_)))


def resolve_inception(weights, compute_fid):
  """(feature_fn or None, weights id, message) for FID: --inception-weights, the cache, a download."""
  if not compute_fid:
    return None, None, 'FID skipped (--no-fid)'
  if weights:  # Asked for explicitly: a bad path is the user's mistake, not a reason to skip FID.
    path = weights
    variables = inception.load_variables(path)
  else:
    try:
      path = inception.cached_weights()
      variables = inception.load_variables(path)
    except UserError as e:
      return None, None, f'FID not computed: {e}'
  weights_id = f'{os.path.basename(path)}|{os.path.getsize(path)}'
  return inception.make_feature_fn(variables), weights_id, None


def prepare_run(workdir, clf, settings):
  """Loads a workdir, its cached real-data references and its conditioning vectors."""
  loaded = checkpoints.load_model(workdir)
  config, model, params, step = loaded.config, loaded.model, loaded.params, loaded.step
  names = tuple(pipeline.attribute_names(config))
  if names != clf.attribute_names:
    raise UserError(
      f'{workdir} is a {config.data.dataset} model but the classifier was trained on '
      f'{clf.config.data.dataset}; train a classifier on the same dataset'
    )
  ref = classifier_reference(workdir, config, clf, settings.batch_size)
  informative = informative_attributes(ref['targets'], clf.one_hot)
  realistic, single = conditioning(
    ref['targets'], names, informative, clf.one_hot, settings.num_samples, settings.seed
  )
  run = Run(
    workdir=workdir,
    name=os.path.basename(os.path.normpath(workdir)),
    step=step,
    sampler=Sampler(config, model, params, batch_size=settings.batch_size),
    classifier_ref=(ref['mu'], ref['sigma']),
    informative=informative,
    realistic=realistic,
    single=single,
    ceiling=_accuracy(ref['predicted'], ref['targets'], informative, clf),
    reference_count=len(ref['targets']),
  )
  if run.sampler.conditional and not clf.one_hot:
    _prepare_composition(run, ref, settings)
  return run


def _prepare_composition(run, ref, settings):
  """Training labels, combined prompts drawn from them, their ceilings and strip attributes."""
  run.train_labels = train_labels(run.workdir, run.config)
  num_prompts = 2 * int(run.informative.sum())  # As many as single-attribute prompts.
  run.joint_ceiling = {}
  for size in COMBINED_SIZES:
    prompts = combined_prompts(run.train_labels, run.informative, size, num_prompts, settings.seed)
    if prompts is None:
      run.joint_ceiling[str(size)] = None
      continue
    run.combined[size] = _repeat(prompts, settings.num_samples)
    run.joint_ceiling[str(size)] = joint_ceiling(
      ref['predicted'], ref['targets'], prompts, run.informative
    )
  run.strip_attributes = strip_attributes(run.informative, settings.interp_strips, settings.seed)
  run.strip_sampler = Sampler(
    run.config, run.sampler.model, run.sampler.params, batch_size=settings.interp_frames
  )


def evaluate(
  workdirs,
  classifier_dir,
  *,
  num_samples=1000,
  sampler='dpm++',
  steps=None,
  guidance=(0.0, 1.0, 2.0, 4.0),
  seed=0,
  out_dir=None,
  inception_weights=None,
  compute_fid=True,
  batch_size=256,
  interp_strips=8,
  interp_frames=8,
  min_train_support=100,
):
  """Evaluates every workdir at every guidance; writes report.json/.md/.png; returns the report."""
  if num_samples < 2:
    raise UserError(f'num_samples = {num_samples}: need at least 2 samples for a covariance')
  if interp_strips < 0 or interp_frames < 2:
    raise UserError(
      f'{interp_strips} interpolation strips of {interp_frames} frames: give --interp-strips '
      '>= 0 (0 skips interpolation) and --interp-frames >= 2'
    )
  if interp_strips and sampler == 'ddpm':
    raise UserError(
      'interpolation strips need a deterministic sampler: use --sampler ddim or dpm++, '
      'or --interp-strips 0'
    )
  if min_train_support < 1:
    raise UserError(f'min_train_support = {min_train_support}: give at least 1')
  out_dir = out_dir or os.path.join(workdirs[0], 'eval')
  settings = Settings(
    num_samples=num_samples,
    sampler=sampler,
    steps=steps,
    guidance=[float(w) for w in guidance],
    seed=seed,
    batch_size=batch_size,
    interp_strips=interp_strips,
    interp_frames=interp_frames,
    min_train_support=min_train_support,
  )
  clf = classifier_lib.load_classifier(classifier_dir)
  feature_fn, weights_id, fid_message = resolve_inception(inception_weights, compute_fid)
  if fid_message:
    logging.warning('%s', fid_message)
  report = {
    'settings': dataclasses.asdict(settings),
    'out_dir': os.path.abspath(out_dir),
    'classifier': {'workdir': os.path.abspath(classifier_dir), 'step': clf.step},
    'fid': {
      'available': feature_fn is not None,
      'weights': weights_id,
      'message': fid_message,
      'reference': 'FID Inception-v3 pool3 (pytorch-fid port of TF inception-2015-12-05)',
    },
    'runs': [],
  }
  for workdir in workdirs:
    run = prepare_run(workdir, clf, settings)
    if feature_fn is not None:
      ref = inception_reference(workdir, run.config, feature_fn, weights_id, batch_size)
      run.inception_ref = (ref['mu'], ref['sigma'])
    scales = settings.guidance if run.sampler.conditional else [None]
    rows = []
    for w in scales:
      rows.append(evaluate_point(run, clf, feature_fn, w, settings, out_dir))
      logging.info('%s guidance %s: %s', run.name, w, rows[-1])
    report['runs'].append(
      {
        'workdir': os.path.abspath(workdir),
        'name': run.name,
        'step': run.step,
        'conditional': run.sampler.conditional,
        'dataset': run.config.data.dataset,
        'image_size': run.config.data.image_size,
        'reference': {'split': run.config.data.eval_split, 'count': run.reference_count},
        'scored_attributes': [n for n, s in zip(clf.attribute_names, run.informative) if s],
        'classifier_ceiling': run.ceiling,
        'joint_ceiling': run.joint_ceiling,
        'results': rows,
      }
    )
  write_report(report, out_dir)
  return report


def _number(value, digits=2):
  return 'n/a' if value is None else f'{value:.{digits}f}'


def markdown_table(report):
  """The report as a Markdown table, one row per (run, guidance)."""
  lines = [
    '| run | step | guidance | samples | FID | classifier FD | attr. acc. (real vectors) '
    '| attr. acc. (single prompts) | classifier ceiling | wall s |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for run in report['runs']:
    for row in run['results']:
      w = 'uncond.' if row['guidance'] is None else f'{row["guidance"]:g}'
      lines.append(
        f'| {run["name"]} | {run["step"]} | {w} | {row["num_samples"]} | {_number(row["fid"])} '
        f'| {_number(row["classifier_fd"], 3)} | {_number(row["attribute_accuracy"]["mean"], 3)} '
        f'| {_number(row["single_attribute_accuracy"]["mean"], 3)} '
        f'| {_number(run["classifier_ceiling"]["mean"], 3)} | {row["wall_time_s"]:.0f} |'
      )
  notes = [
    'FID and classifier FD: the samples column against the whole validation split, both '
    'uint8 round-tripped; FID is only comparable at equal sample counts.'
  ]
  if report['fid']['message']:
    notes.append(report['fid']['message'])
  return '\n'.join(lines + [''] + notes + [''] + _composition_table(report)) + '\n'


def _composition_table(report):
  """Joint accuracy, unspecified-attribute gap and interpolation rows, with their notes."""
  lines = [
    '| run | guidance | joint acc. 2 attr. (ceiling) | joint acc. 3 attr. (ceiling) '
    '| unspecified gap (prompts) | interp. identity kept | interp. single flip |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for run in report['runs']:
    for row in run['results']:
      joint, strips = row['joint_accuracy'], row['interpolation']
      unspecified = row['unspecified_attributes']
      if joint is None and strips is None:
        continue
      cells = [
        f'{_number(joint[k], 3)} ({_number(run["joint_ceiling"][k], 3)})' if joint else 'n/a'
        for k in map(str, COMBINED_SIZES)
      ]
      if unspecified:
        cells.append(f'{_number(unspecified["mean_abs_gap"], 3)} ({unspecified["num_prompts"]})')
      else:
        cells.append('n/a')
      cells += [_number(strips and strips[k], 3) for k in ('identity_kept', 'single_flip')]
      lines.append(f'| {run["name"]} | {row["guidance"]:g} | {" | ".join(cells)} |')
  if len(lines) == 2:
    return ['Joint, unspecified and interpolation metrics: not applicable to these runs.']
  support = report['settings']['min_train_support']
  return lines + [
    '',
    'Joint accuracy: samples with every specified attribute read back, for prompts of 2 or 3 '
    'attributes of real training images; ceiling: the same on the validation images '
    'matching each prompt.',
    'Unspecified gap: mean |rate in the samples - rate in the training images matching the '
    f'prompt| of each attribute a single or combined prompt leaves unspecified, over prompts '
    f'matched by at least {support} training images (prompts: how many).',
    'Interpolation: frames after the first whose other attributes read as in the first; '
    'strips whose interpolated attribute reads absent, then present, changing once.',
  ]


def plot_report(report):
  """FID / classifier FD and attribute accuracy vs guidance, one line per run."""

  def series(metric, dashed_ceiling=False):
    out = []
    for run in report['runs']:
      xs = [r['guidance'] if r['guidance'] is not None else 1.0 for r in run['results']]
      out.append((run['name'], xs, [metric(r) for r in run['results']], not run['conditional']))
      if dashed_ceiling:
        out.append((f'{run["name"]} ceiling', xs[:1], [run['classifier_ceiling']['mean']], True))
    return out

  def composition():
    out = []
    for run in report['runs']:
      xs = [r['guidance'] for r in run['results']]
      for label, metric in (
        ('joint 2', lambda r: r['joint_accuracy'] and r['joint_accuracy']['2']),
        ('joint 3', lambda r: r['joint_accuracy'] and r['joint_accuracy']['3']),
        ('identity kept', lambda r: r['interpolation'] and r['interpolation']['identity_kept']),
      ):
        ys = [metric(r) for r in run['results']]
        if any(y is not None for y in ys):
          out.append((f'{run["name"]} {label}', xs, ys, False))
    return out

  panels = [
    plot.line_chart(
      'classifier Frechet distance', 'guidance', series(lambda r: r['classifier_fd'])
    ),
    plot.line_chart(
      'attribute accuracy (real vectors)',
      'guidance',
      series(lambda r: r['attribute_accuracy']['mean'], dashed_ceiling=True),
    ),
    plot.line_chart('joint accuracy, interpolation identity', 'guidance', composition()),
  ]
  if report['fid']['available']:
    panels.insert(0, plot.line_chart('FID', 'guidance', series(lambda r: r['fid'])))
  return plot.side_by_side(panels)


def write_report(report, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(markdown_table(report))
  plot_report(report).save(os.path.join(out_dir, 'report.png'))
