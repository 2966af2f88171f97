"""`fdiff evaluate` on tiny conditional and unconditional workdirs: a complete report and plot."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from test_inception import random_state_dict

from configs import test as test_config
from fdiff_jax import cli, train
from fdiff_jax.data.synth_celeba import RENDERED_ATTRIBUTES, write_synthetic_celeba
from fdiff_jax.metrics import inception

ROW_FIELDS = {
  'guidance',
  'num_samples',
  'fid',
  'classifier_fd',
  'attribute_accuracy',
  'single_attribute_accuracy',
  'wall_time_s',
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Synthetic faces, a conditional and an unconditional 6-step model, a 40-step classifier."""
  root = tmp_path_factory.mktemp('evaluate')
  write_synthetic_celeba(str(root / 'files'), num=200, seed=0)
  data = [f'--config.data.manual_dir={root / "files"}', f'--config.data.data_dir={root / "tfds"}']
  for name, conditional in (('cond', True), ('uncond', False)):
    config = test_config.get_config()
    config.data.manual_dir, config.data.data_dir = str(root / 'files'), str(root / 'tfds')
    config.model.conditional = conditional
    train.train_diffusion(config, str(root / name))
  assert (
    cli.main(
      [
        'train-classifier',
        '--config',
        'configs/test.py',
        '--workdir',
        str(root / 'clf'),
        '--config.classifier.width=8',
        '--config.classifier.num_steps=40',
        *data,
      ]
    )
    == 0
  )
  weights = str(root / 'inception.npz')
  np.savez(weights, **random_state_dict())
  return root, weights


def run_evaluate(root, out, *extra, runs=('cond', 'uncond'), guidance='0,2'):
  workdirs = [arg for name in runs for arg in ('--workdir', str(root / name))]
  return cli.main(
    [
      'evaluate',
      *workdirs,
      '--classifier',
      str(root / 'clf'),
      '--num-samples',
      '8',
      '--steps',
      '2',
      '--guidance',
      guidance,
      '--seed',
      '3',
      '--batch-size',
      '8',
      '--out-dir',
      str(out),
      *extra,
    ]
  )


def finite_numbers(tree):
  if isinstance(tree, dict):
    return all(finite_numbers(v) for v in tree.values())
  return not isinstance(tree, float) or math.isfinite(tree)


def test_report_is_complete_with_fid_and_plot(setup, capsys):
  root, weights = setup
  assert run_evaluate(root, root / 'out', '--inception-weights', weights) == 0
  with open(root / 'out' / 'report.json') as f:
    report = json.load(f)
  assert report['fid']['available'] and report['settings']['num_samples'] == 8
  cond, uncond = report['runs']
  assert cond['conditional'] and not uncond['conditional']
  assert [r['guidance'] for r in cond['results']] == [0.0, 2.0]
  assert [r['guidance'] for r in uncond['results']] == [None]  # Guidance means nothing there.
  for run in report['runs']:
    assert run['reference']['count'] > 0 and 0 <= run['classifier_ceiling']['mean'] <= 1
    assert set(run['scored_attributes']) <= set(RENDERED_ATTRIBUTES)
    for row in run['results']:
      assert set(row) == ROW_FIELDS and row['num_samples'] == 8
      assert isinstance(row['fid'], float) and row['fid'] > 1e-6 and row['classifier_fd'] > 0
      assert 0 <= row['attribute_accuracy']['mean'] <= 1
      assert set(row['single_attribute_accuracy']['per_attribute']) == set(run['scored_attributes'])
      assert finite_numbers(row)
  table = (root / 'out' / 'report.md').read_text()
  assert table.count('\n| cond |') == 2 and table.count('\n| uncond |') == 1
  assert '| uncond. | 8 |' in table
  assert table in capsys.readouterr().out
  plot = Image.open(root / 'out' / 'report.png')
  assert plot.width == 3 * 480 and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 3
  assert os.path.getsize(root / 'out' / 'samples' / 'cond_w2.png') > 0
  assert len(os.listdir(root / 'cond' / 'eval_cache')) == 2  # Classifier and Inception references.


def test_without_weights_reports_offline_metrics_and_how_to_get_them(
  setup, tmp_path, monkeypatch, capsys
):
  root, _ = setup
  monkeypatch.setenv('FDIFF_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(inception, 'WEIGHTS_URL', (tmp_path / 'offline.pth').as_uri())
  assert run_evaluate(root, tmp_path / 'out', runs=('cond',), guidance='1') == 0
  report = json.loads((tmp_path / 'out' / 'report.json').read_text())
  assert not report['fid']['available'] and '--inception-weights' in report['fid']['message']
  rows = [row for run in report['runs'] for row in run['results']]
  assert all(row['fid'] is None and math.isfinite(row['classifier_fd']) for row in rows)
  assert inception.WEIGHTS_SHA256 in capsys.readouterr().out
  assert Image.open(tmp_path / 'out' / 'report.png').width == 2 * 480


def test_explicit_inception_weights_that_cannot_load_are_a_one_line_error(setup, tmp_path, capsys):
  root, _ = setup
  code = run_evaluate(root, tmp_path / 'out', '--inception-weights', str(tmp_path / 'typo.pth'))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'typo.pth' in err[0] and 'not found' in err[0]
  assert not (tmp_path / 'out').exists()  # No report without the FID that was asked for.


def test_classifier_of_another_dataset_is_a_one_line_error(setup, tmp_path, capsys):
  root, _ = setup
  clf = str(tmp_path / 'digits_clf')  # A real (one-step) classifier, of the digits.
  assert (
    cli.main(
      [
        'train-classifier',
        '--config',
        'configs/digits.py',
        '--workdir',
        clf,
        '--config.classifier.width=8',
        '--config.classifier.num_steps=1',
        f'--config.data.data_dir={tmp_path / "tfds"}',
      ]
    )
    == 0
  )
  capsys.readouterr()
  assert (
    cli.main(
      [
        'evaluate',
        '--workdir',
        str(root / 'cond'),
        '--classifier',
        clf,
        '--num-samples',
        '4',
        '--no-fid',
      ]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'celeba model' in err[0] and 'trained on digits' in err[0]
