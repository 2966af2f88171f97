"""The attribute classifier learns the synthetic CelebA's rendered attributes and the digits.

It trains in the shared loop: exact resume, SIGTERM checkpoints and the NaN stop
are checked here on a tiny classifier too.
"""

import json
import os

import faces
import jax
import numpy as np
import pytest
from preemption import sigterm_after_first_loss

from configs import digits as digits_config
from configs import test as test_config
from fdiff_jax import classifier, cli, loop
from fdiff_jax.data import CELEBA_ATTRIBUTES, RENDERED_ATTRIBUTES, pipeline
from fdiff_jax.data.synth_celeba import write_synthetic_celeba


@pytest.fixture(scope='module')
def celeba_classifier(tmp_path_factory):
  """Trained once through `fdiff train-classifier` on 800 synthetic faces at 32x32."""
  root = tmp_path_factory.mktemp('celeba')
  write_synthetic_celeba(str(root / 'files'), num=800, seed=0)
  workdir = str(root / 'classifier')
  code = cli.main(
    [
      'train-classifier',
      '--config',
      'configs/test.py',
      '--workdir',
      workdir,
      f'--config.data.manual_dir={root / "files"}',
      f'--config.data.data_dir={root / "tfds"}',
      '--config.data.image_size=32',
      '--config.classifier.width=16',
      '--config.classifier.batch_size=32',
      '--config.classifier.num_steps=200',
    ]
  )
  assert code == 0
  return workdir


def test_learns_every_rendered_attribute(celeba_classifier):
  with open(os.path.join(celeba_classifier, classifier.VALIDATION_FILE)) as f:
    result = json.load(f)
  assert result['step'] == 200 and result['examples'] >= 60
  rendered = {name: result['per_attribute'][name] for name in RENDERED_ATTRIBUTES}
  # 80 validation faces after 200 steps: the mean is near 0.99, single attributes vary by host
  # (0.875-1.0). The balanced ones (Male, Smiling, Wearing_Lipstick, ~50%) set the floor: a
  # classifier that ignored them would score near 0.5 there.
  assert np.mean(list(rendered.values())) >= 0.95, rendered
  assert min(rendered.values()) >= 0.8, rendered


def test_predict_attributes_from_a_saved_classifier(celeba_classifier):
  clf = classifier.load_classifier(celeba_classifier)
  assert clf.step == 200
  batch = next(pipeline.create_eval_iterator(clf.config, batch_size=64))
  predicted = classifier.predict_attributes(celeba_classifier, batch['image'])
  assert predicted.shape == (len(batch['image']), len(CELEBA_ATTRIBUTES))
  assert set(np.unique(predicted)) <= {-1.0, 1.0}
  rendered = [CELEBA_ATTRIBUTES.index(n) for n in RENDERED_ATTRIBUTES]
  assert np.mean(predicted[:, rendered] == batch['attributes'][:, rendered]) >= 0.9
  features = classifier.features(celeba_classifier, batch['image'][:3])
  assert features.shape == (3, clf.config.classifier.features)
  half = clf(batch['image'][:, ::2, ::2])[0]  # Other sizes are resized to the classifier's.
  assert half.shape == predicted.shape


def test_learns_digits(tmp_path):
  config = digits_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.classifier.update(width=16, num_steps=150)
  result = classifier.train_classifier(config, str(tmp_path / 'classifier'))
  assert result['split'] == 'test' and result['examples'] > 200
  assert result['accuracy'] >= 0.9, result


def test_one_hot_accuracy_scores_only_the_asked_class():
  names = tuple(str(d) for d in range(10))
  asked = np.where(np.eye(10)[[3, 3]] > 0, 1.0, -1.0)
  predicted = np.where(np.eye(10)[[3, 5]] > 0, 1.0, -1.0)  # One right, one wrong digit.
  mean, per = classifier.accuracy(predicted, asked, classifier.scored(asked, one_hot=True), names)
  assert mean == 0.5 and per == {'3': 0.5}
  mean, _ = classifier.accuracy(predicted, asked, classifier.scored(asked, one_hot=False), names)
  assert mean == 0.9  # Multi-label scoring would count the 8 agreeing -1s.


@pytest.fixture(scope='module')
def small_celeba(tmp_path_factory):
  return faces.synthetic_celeba(tmp_path_factory.mktemp('small_celeba'), num=60)


def tiny_config(celeba_dirs, **classifier_overrides):
  """A tiny classifier at 16x16; a constant learning rate, so a shorter run is a prefix."""
  config = test_config.get_config()
  config.data.manual_dir, config.data.data_dir = celeba_dirs
  config.classifier.update(
    width=8,
    features=16,
    batch_size=8,
    num_steps=6,
    log_every=1,
    checkpoint_every=3,
    warmup_steps=2,
    lr_schedule='constant',
  )
  config.classifier.update(classifier_overrides)
  return config


def test_resume_is_bitwise_identical_to_a_straight_run(small_celeba, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  classifier.train_classifier(tiny_config(small_celeba), straight)
  first = classifier.train_classifier(tiny_config(small_celeba, num_steps=3), resumed)
  second = classifier.train_classifier(tiny_config(small_celeba), resumed)
  assert first['step'] == 3 and second['step'] == 6
  a, b = classifier.load_classifier(straight), classifier.load_classifier(resumed)
  assert a.step == b.step == 6
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  step_3 = classifier.load_classifier(resumed, step=3)  # Training changed the parameters.
  assert any(
    np.abs(x - y).max() > 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(step_3.params))
  )


def test_nan_loss_stops_and_keeps_only_good_checkpoints(small_celeba, tmp_path):
  config = tiny_config(
    small_celeba,
    learning_rate=1e30,
    grad_clip=1e30,
    warmup_steps=1,
    checkpoint_every=1,
    num_steps=8,
    keep_checkpoints=100,
  )
  workdir = str(tmp_path)
  with pytest.raises(loop.TrainingDiverged, match=r'last good checkpoint.*config\.classifier'):
    classifier.train_classifier(config, workdir)
  assert not os.path.exists(os.path.join(workdir, classifier.VALIDATION_FILE))
  good = classifier.load_classifier(workdir)
  assert 0 < good.step < 8
  # "Good" means its parameters still give a finite loss on the batch of the next step.
  data_config = config.copy_and_resolve_references()
  data_config.train.batch_size = config.classifier.batch_size
  batch = next(pipeline.create_train_iterator(data_config, start_step=good.step))
  logits, _ = good.model.apply({'params': good.params}, batch['image'])
  loss = classifier.classification_loss(logits, batch['attributes'], good.one_hot)
  assert np.isfinite(float(loss))


def test_sigterm_saves_a_restorable_checkpoint_and_skips_validation(small_celeba, tmp_path):
  workdir = str(tmp_path / 'w')
  files, tfds_dir = small_celeba
  args = [
    'train-classifier',
    '--config',
    'configs/test.py',
    '--workdir',
    workdir,
    f'--config.data.manual_dir={files}',
    f'--config.data.data_dir={tfds_dir}',
    '--config.classifier.width=8',
    '--config.classifier.batch_size=8',
    '--config.classifier.num_steps=100000',
    '--config.classifier.checkpoint_every=100000',
    '--config.classifier.log_every=1',
  ]
  steps = sigterm_after_first_loss(args, workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert classifier.load_classifier(workdir).step == steps[0]
  assert not os.path.exists(os.path.join(workdir, classifier.VALIDATION_FILE))
