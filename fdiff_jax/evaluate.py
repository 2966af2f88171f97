"""`fdiff evaluate`: FID, classifier Frechet distance and attribute control vs guidance.

For every workdir and guidance scale it samples N images conditioned on
attribute vectors of real validation images (realistic combinations) and N
on single-attribute prompts ("Smiling", "-Male", ...; only that attribute is
specified), then reports:
  * FID (FID Inception pool features) and the classifier Frechet distance
    (the attribute classifier's penultimate features) of the realistic
    samples against the whole validation split, both uint8 round-tripped;
  * attribute-control accuracy: how often the classifier reads back each
    specified attribute, with its accuracy on real validation images as the
    ceiling;
  * sample count and wall time.
An unconditional workdir ignores attributes and guidance: it is sampled once
and reported with guidance null, the baseline the conditional runs beat.
Writes report.json, report.md and report.png.
"""

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from fdiff_jax import checkpoints, images
from fdiff_jax import classifier as classifier_lib
from fdiff_jax.batching import map_batches
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.metrics import fid, inception, plot
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
  return realistic.astype(np.float32), np.repeat(single, -(-num_samples // len(single)), axis=0)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every run is evaluated with."""

  num_samples: int
  sampler: str
  steps: int | None
  guidance: list
  seed: int
  batch_size: int


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
  }
  if feature_fn is not None:
    sample_stats = fid.statistics(_features(feature_fn, samples, settings.batch_size))
    row['fid'] = fid.frechet_distance(*sample_stats[:2], *run.inception_ref)
  row['wall_time_s'] = time.perf_counter() - start
  grid = images.make_grid(
    images.to_uint8(samples[:64]), rows=int(np.ceil(min(len(samples), 64) ** 0.5))
  )
  name = 'uncond' if guidance is None else f'w{guidance:g}'
  images.save_png(
    os.path.join(out_dir, 'samples', f'{run.name}_{name}.png'),
    grid,
    scale=max(1, 512 // grid.shape[0]),
  )
  return row


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
  return Run(
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
):
  """Evaluates every workdir at every guidance; writes report.json/.md/.png; returns the report."""
  if num_samples < 2:
    raise UserError(f'num_samples = {num_samples}: need at least 2 samples for a covariance')
  out_dir = out_dir or os.path.join(workdirs[0], 'eval')
  settings = Settings(
    num_samples=num_samples,
    sampler=sampler,
    steps=steps,
    guidance=[float(w) for w in guidance],
    seed=seed,
    batch_size=batch_size,
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
  return '\n'.join(lines + [''] + notes) + '\n'


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

  panels = [
    plot.line_chart(
      'classifier Frechet distance', 'guidance', series(lambda r: r['classifier_fd'])
    ),
    plot.line_chart(
      'attribute accuracy (real vectors)',
      'guidance',
      series(lambda r: r['attribute_accuracy']['mean'], dashed_ceiling=True),
    ),
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
