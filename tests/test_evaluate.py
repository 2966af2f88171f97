"""`fdiff evaluate`: its metric functions on hand-made arrays, and a complete report and plot
on tiny conditional and unconditional workdirs."""

import itertools
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
from fdiff_jax.metrics import attribute_control as control
from fdiff_jax.metrics import inception

ROW_FIELDS = {
  'guidance',
  'num_samples',
  'fid',
  'classifier_fd',
  'attribute_accuracy',
  'single_attribute_accuracy',
  'joint_accuracy',
  'unspecified_attributes',
  'interpolation',
  'wall_time_s',
}
NAMES = ('Male', 'Mustache', 'Smiling', 'Bald')
INFORMATIVE = np.array([True, True, True, False])  # Bald never varies: never scored.


def test_joint_accuracy_counts_samples_with_every_specified_attribute_read_back():
  vectors = np.array([[1, -1, 0, 0], [1, -1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]], np.float32)
  predicted = np.array([[1, -1, 1, 1], [1, 1, -1, -1], [-1, 1, 1, -1], [1, 1, 1, 1]], np.float32)
  assert control.joint_accuracy(predicted, vectors, INFORMATIVE) == 0.75  # Row 1 misses one.
  # A non-informative attribute is not scored; a row with nothing scored does not count.
  vectors = np.concatenate([vectors, [[0, 0, 0, 1]]])
  vectors[0, 3] = -1  # Read as +1, but Bald is not scored.
  predicted = np.concatenate([predicted, [[-1, -1, -1, -1]]])
  assert control.joint_accuracy(predicted, vectors, INFORMATIVE) == 0.75
  assert control.joint_accuracy(predicted[4:], vectors[4:], INFORMATIVE) is None


def test_joint_ceiling_averages_over_prompts_the_accuracy_on_matching_real_images():
  targets = np.array([[1, 1, -1, -1], [1, 1, 1, -1], [-1, -1, 1, -1], [-1, -1, -1, -1]])
  predicted = np.array([[1, 1, -1, -1], [1, -1, 1, -1], [-1, -1, 1, -1], [1, -1, -1, -1]])
  prompts = np.array([[1, 1, 0, 0], [0, -1, 0, 0]], np.float32)
  # Male,Mustache matches rows 0 and 1 (1 of 2 read right); -Mustache rows 2 and 3 (2 of 2).
  assert control.joint_ceiling(predicted, targets, prompts, INFORMATIVE) == 0.75


def test_unspecified_rates_compare_samples_with_the_training_conditional():
  # Training labels: 3 images with a mustache, 2 of them male: P(Male | Mustache) = 2/3.
  labels = np.array(
    [[1, 1, 1, -1], [1, 1, -1, -1], [-1, 1, -1, -1], [-1, -1, 1, -1], [1, -1, 1, -1]], np.float32
  )
  vectors = np.tile([[0, 1, 0, 0]], (4, 1)).astype(np.float32)  # Prompt "Mustache", 4 samples.
  predicted = np.array([[1, 1, 1, 1], [-1, 1, 1, 1], [-1, 1, 1, 1], [-1, 1, -1, 1]], np.float32)
  result = control.unspecified_rates(predicted, vectors, labels, INFORMATIVE, NAMES, 3)
  prompt = result['prompts']['Mustache']
  assert prompt['train_support'] == 3 and prompt['samples'] == 4
  assert set(prompt['rates']) == {'Male', 'Smiling'}  # Unspecified and informative only.
  assert np.isclose(prompt['rates']['Male']['train'], 2 / 3)
  assert prompt['rates']['Male']['sampled'] == 0.25
  assert np.isclose(prompt['rates']['Smiling']['train'], 1 / 3)
  assert prompt['rates']['Smiling']['sampled'] == 0.75
  gap = (abs(0.25 - 2 / 3) + abs(0.75 - 1 / 3)) / 2
  assert np.isclose(prompt['mean_abs_gap'], gap) and np.isclose(result['mean_abs_gap'], gap)
  # 4 samples at the training rates 2/3 and 1/3 (mirror images): every outcome, weighted.
  floor = sum(
    np.prod([1 / 3 if x else 2 / 3 for x in draws]) * abs(sum(draws) / 4 - 1 / 3)
    for draws in itertools.product((0, 1), repeat=4)
  )
  assert np.isclose(result['sampling_floor'], floor)
  # A second prompt, "-Male,Smiling" (one training match), is skipped, not reported as noise.
  vectors = np.concatenate([vectors, [[-1, 0, 1, 0]]])
  predicted = np.concatenate([predicted, [[-1, 1, 1, 1]]])
  result = control.unspecified_rates(predicted, vectors, labels, INFORMATIVE, NAMES, 3)
  assert list(result['prompts']) == ['Mustache'] and result['skipped_prompts'] == 1
  assert np.isclose(result['mean_abs_gap'], gap) and result['min_train_support'] == 3
  skipped = control.unspecified_rates(predicted, vectors, labels, INFORMATIVE, NAMES, 4)
  assert skipped['mean_abs_gap'] is None and skipped['skipped_prompts'] == 2
  assert skipped['sampling_floor'] is None


def test_sampling_gap_is_the_mean_gap_of_binomial_draws():
  assert control.sampling_gap(1, 0.3) == pytest.approx(2 * 0.3 * 0.7)  # |1-p| p + |0-p| (1-p).
  assert control.sampling_gap(2, 0.5) == pytest.approx(0.25)
  assert control.sampling_gap(7, 0.0) == control.sampling_gap(7, 1.0) == 0.0
  draws = np.random.default_rng(0).binomial(2000, 0.2, size=200_000) / 2000
  assert control.sampling_gap(2000, 0.2) == pytest.approx(np.abs(draws - 0.2).mean(), rel=0.01)


def test_interpolation_metrics_on_hand_made_readings():
  # Two strips of three frames; strip 0 moves Male, strip 1 moves Smiling.
  readings = np.array(
    [
      [[-1, -1, 1, 1], [1, -1, 1, -1], [1, 1, 1, 1]],  # Mustache changes at frame 2.
      [[1, 1, -1, 1], [1, 1, 1, -1], [1, 1, -1, -1]],  # Only Smiling and unscored Bald change.
    ],
    np.float32,
  )
  held = np.array([[False, True, True, False], [True, True, False, False]])  # Not Bald.
  assert control.identity_kept(readings, held) == 0.75  # 3 of 4 later frames.
  changes = control.held_changes(readings, held)  # Mustache: 1 of 2 frames; Bald never held.
  np.testing.assert_array_equal(changes, [0.0, 0.25, 0.0, np.nan])
  held[0, 1] = False  # Mustache tied to Male: its change no longer counts.
  assert control.identity_kept(readings, held) == 1.0
  strips = np.array([[-1, -1, 1, 1], [-1, 1, -1, 1], [1, 1, 1, 1], [-1, -1, -1, -1]])
  assert control.single_flip(strips) == 0.25  # Only the first: absent, then present, once.


def test_strips_move_to_the_nearest_real_vector_and_hold_the_rest():
  # Columns: Black_Hair, Blond_Hair, Smiling, Eyeglasses (never present: not informative).
  labels = np.array(
    [[1, -1, 1, -1], [1, -1, -1, -1], [-1, 1, 1, -1], [-1, 1, -1, -1], [-1, 1, 1, -1]],
    np.float32,
  )
  informative = np.array([True, True, True, False])
  moved = np.array([1, 1, 2, 0, 1])
  starts, ends = control.strip_endpoints(labels, informative, moved, seed=3)
  for start, end, attribute in zip(starts, ends, moved):
    assert start[attribute] == -1 and end[attribute] == 1
    assert start[3] == end[3] == 0  # Uninformative: left unspecified.
    for vector in (start, end):  # Both ends are real vectors.
      assert (labels[:, :3] == vector[:3]).all(1).any()
  held = control.held_attributes(starts, ends)
  blond = moved == 1  # Blond_Hair replaces Black_Hair, Smiling is held.
  assert (ends[blond, 0] == -1).all() and held[blond].tolist() == [[False, False, True, False]] * 3
  assert held[2].tolist() == [True, True, False, False]  # Smiling alone moves.
  np.testing.assert_array_equal(
    starts, control.strip_endpoints(labels, informative, moved, seed=3)[0]
  )
  lone = control.strip_endpoints(labels[:, :3] * 0 - 1, informative[:3], [0], seed=0)
  assert lone[0].tolist() == [[-1, 0, 0]] and lone[1].tolist() == [[1, 0, 0]]  # Never present.


def test_combined_prompts_are_real_combinations_of_informative_attributes():
  rng = np.random.default_rng(0)
  labels = np.where(rng.random((50, 6)) < 0.2, 1, -1).astype(np.float32)  # Mostly absent.
  informative = np.array([True, True, False, True, True, True])
  for size in (2, 3):
    prompts = control.combined_prompts(labels, informative, size, 40, seed=1)
    assert prompts.shape == (40, 6) and ((prompts != 0).sum(1) == size).all()
    assert not prompts[:, 2].any()  # Only informative attributes are picked.
    assert all(control.matching(labels, p).any() for p in prompts)  # Occur in the data.
    assert (prompts > 0).any() and (prompts < 0).any()
    np.testing.assert_array_equal(
      prompts, control.combined_prompts(labels, informative, size, 40, seed=1)
    )
  assert control.combined_prompts(labels, informative, 6, 4, seed=1) is None
  strips = control.strip_attributes(informative, 7, seed=0)
  assert sorted(strips[:5]) == [0, 1, 3, 4, 5] and list(strips[5:]) == list(strips[:2])


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


def run_evaluate(root, out, *extra, runs=('cond', 'uncond'), guidance='0,2', strips=2):
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
      '--interp-strips',
      str(strips),
      '--interp-frames',
      '3',
      *extra,
    ]
  )


def train_labels_from_files(files):
  """{name: [N] +-1} of the training partition, parsed from the official CelebA text files."""
  with open(files / 'list_eval_partition.txt') as f:
    train = {line.split()[0] for line in f if line.split()[1] == '0'}
  with open(files / 'list_attr_celeba.txt') as f:
    lines = f.read().splitlines()
  names = lines[1].split()
  rows = np.array(
    [[int(v) for v in line.split()[1:]] for line in lines[2:] if line.split()[0] in train]
  )
  return dict(zip(names, rows.T))


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
  for row in uncond['results']:  # Composition metrics do not apply to the baseline.
    assert row['joint_accuracy'] is row['unspecified_attributes'] is row['interpolation'] is None
  assert uncond['joint_ceiling'] is None
  assert all(0 <= cond['joint_ceiling'][k] <= 1 for k in ('2', '3'))
  labels = train_labels_from_files(root / 'files')
  for row in cond['results']:
    assert all(0 <= row['joint_accuracy'][k] <= 1 for k in ('2', '3'))
    unspecified = row['unspecified_attributes']
    assert unspecified['min_train_support'] == 100 == report['settings']['min_train_support']
    assert unspecified['num_prompts'] > 0 and unspecified['skipped_prompts'] > 0  # 160 in train.
    assert 0 < unspecified['sampling_floor'] < 0.5
    for text, prompt in unspecified['prompts'].items():  # Against the label files themselves.
      specified = [(item.lstrip('-'), -1 if item[0] == '-' else 1) for item in text.split(',')]
      match = np.all([labels[name] == value for name, value in specified], axis=0)
      assert prompt['train_support'] == match.sum() >= 100
      for name, rates in prompt['rates'].items():
        assert name in cond['scored_attributes'] and name not in dict(specified)
        assert np.isclose(rates['train'], (labels[name][match] > 0).mean())
        assert 0 <= rates['sampled'] <= 1
    strips = row['interpolation']
    assert strips['strips'] == 2 and strips['frames'] == 3
    assert set(strips['attributes']) <= set(cond['scored_attributes'])
    assert strips['identity_kept'] * 4 in range(5)  # 2 strips x 2 frames after the first.
    assert strips['single_flip'] * 2 in range(3)
    assert set(strips['held_changes']) <= set(cond['scored_attributes'])
    assert all(v * 4 in range(5) for v in strips['held_changes'].values())  # Of 2 or 4 frames.
  table = (root / 'out' / 'report.md').read_text()
  assert table.count('\n| cond |') == 4 and table.count('\n| uncond |') == 1  # Two tables.
  assert 'at least 100 training images' in table
  assert '| uncond. | 8 |' in table
  assert table in capsys.readouterr().out
  plot = Image.open(root / 'out' / 'report.png')
  assert plot.width == 4 * 480 and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 3
  assert os.path.getsize(root / 'out' / 'samples' / 'cond_w2.png') > 0
  width, height = Image.open(root / 'out' / 'samples' / 'cond_w2_interp.png').size
  assert width * (2 * 18 + 2) == height * (3 * 18 + 2)  # 2 strips of 3 16x16 frames, as rows.
  # Classifier and Inception references and the training labels.
  assert len(os.listdir(root / 'cond' / 'eval_cache')) == 3


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
  assert Image.open(tmp_path / 'out' / 'report.png').width == 3 * 480


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


@pytest.mark.parametrize(
  'flags, message',
  [
    (('--interp-frames', '1'), "argument --interp-frames: '1' is not a whole number >= 2"),
    (('--interp-strips', '-1'), "argument --interp-strips: '-1' is not a whole number >= 0"),
    (('--sampler', 'ddpm'), 'deterministic sampler'),
  ],
)
def test_bad_interpolation_flags_are_a_one_line_error(tmp_path, capsys, flags, message):
  argv = ['evaluate', '--workdir', str(tmp_path / 'w'), '--classifier', str(tmp_path / 'c')]
  assert cli.main([*argv, '--out-dir', str(tmp_path / 'out'), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]
  assert not (tmp_path / 'out').exists()
