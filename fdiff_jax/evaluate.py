"""`fdiff evaluate`: sampling, cached real-data references and the evaluation loop.

For every workdir and guidance scale it samples N images conditioned on
attribute vectors of real validation images (realistic combinations), N on
single-attribute prompts and N on each of 2- and 3-attribute prompts, plus
interpolation strips made by `generate.interpolate` (as `fdiff interpolate`),
reads them back with the attribute classifier, and reports per row: FID (FID
Inception pool features) and the classifier Frechet distance (its
penultimate features) of the realistic samples against the whole validation
split, both uint8 round-tripped; attribute-control accuracy, with the
classifier's accuracy on real validation images as the ceiling; the joint,
unspecified-attribute and interpolation metrics; sample count and wall time.
Real-data references (feature statistics, classifier readings, training
labels) are computed once and cached in WORKDIR/eval_cache.
An unconditional workdir ignores attributes and guidance: it is sampled once
and reported with guidance null, the baseline the conditional runs beat; the
joint, unspecified and interpolation metrics are null for it, and for one-hot
datasets (digits), where an image has one class and nothing to combine.

The prompts and what each attribute-control metric means:
`fdiff_jax.metrics.attribute_control`. Writing report.json, report.md and
report.png: `fdiff_jax.metrics.report`.
"""

import dataclasses
import hashlib
import os
import time

import numpy as np
from absl import logging

from fdiff_jax import checkpoints, generate, images
from fdiff_jax import classifier as classifier_lib
from fdiff_jax.batching import map_batches
from fdiff_jax.data import pipeline, sources
from fdiff_jax.errors import UserError
from fdiff_jax.metrics import attribute_control as control
from fdiff_jax.metrics import fid, inception
from fdiff_jax.metrics import report as report_lib
from fdiff_jax.sampler import Sampler

CACHE_DIR = 'eval_cache'


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
  strip_ends: tuple | None = None  # (start, end) [S, A] vectors of the strips.
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
      str(k): control.joint_accuracy(combined[k], run.combined[k], run.informative)
      if k in combined
      else None
      for k in control.COMBINED_SIZES
    }
    row['unspecified_attributes'] = control.unspecified_rates(
      np.concatenate([single_predicted, *combined.values()]),
      np.concatenate([run.single, *run.combined.values()]),
      run.train_labels,
      run.informative,
      clf.attribute_names,
      settings.min_train_support,
    )
  if len(run.strip_attributes):
    frames, readings = _interpolation_strips(run, clf, w, settings)
    held = control.held_attributes(*run.strip_ends)
    changes = control.held_changes(readings, held)
    row['interpolation'] = {
      'identity_kept': control.identity_kept(readings, held),
      'held_attributes': float(held.sum(1).mean()),
      'held_changes': {
        n: float(c) for n, c in zip(clf.attribute_names, changes) if not np.isnan(c)
      },
      'single_flip': control.single_flip(
        readings[np.arange(len(readings)), :, run.strip_attributes]
      ),
      'strips': len(readings),
      'frames': settings.interp_frames,
      'attributes': [clf.attribute_names[a] for a in run.strip_attributes],
    }
    _save_grid(  # One row per strip.
      frames, len(readings), os.path.join(out_dir, 'samples', f'{run.name}_{name}_interp.png')
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

  Strip s goes from run.strip_ends[0][s] to run.strip_ends[1][s], moving
  attribute run.strip_attributes[s] from -1 to +1, from image 0 of seed
  `settings.seed + s`.
  """
  frames = []
  for s, (start, end) in enumerate(zip(*run.strip_ends)):
    strip = generate.interpolate(
      run.strip_sampler,
      start,
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
  informative = control.informative_attributes(ref['targets'], clf.one_hot)
  realistic, single = control.conditioning(
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
  for size in control.COMBINED_SIZES:
    prompts = control.combined_prompts(
      run.train_labels, run.informative, size, num_prompts, settings.seed
    )
    if prompts is None:
      run.joint_ceiling[str(size)] = None
      continue
    run.combined[size] = control.repeat_prompts(prompts, settings.num_samples)
    run.joint_ceiling[str(size)] = control.joint_ceiling(
      ref['predicted'], ref['targets'], prompts, run.informative
    )
  run.strip_attributes = control.strip_attributes(
    run.informative, settings.interp_strips, settings.seed
  )
  run.strip_ends = control.strip_endpoints(
    run.train_labels, run.informative, run.strip_attributes, settings.seed
  )
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
  images.check_writable(out_dir, 'report folder', folder=True)  # Before any sampling.
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
  report_lib.write_report(report, out_dir)
  return report
