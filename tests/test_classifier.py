"""The attribute classifier learns the synthetic CelebA's rendered attributes and the digits."""
import json
import os

import numpy as np
import pytest

from configs import digits as digits_config
from fdiff_jax import classifier, cli
from fdiff_jax.data import CELEBA_ATTRIBUTES, RENDERED_ATTRIBUTES, pipeline
from fdiff_jax.data.synth_celeba import write_synthetic_celeba


@pytest.fixture(scope='module')
def celeba_classifier(tmp_path_factory):
  """Trained once through `fdiff train-classifier` on 800 synthetic faces at 32x32."""
  root = tmp_path_factory.mktemp('celeba')
  write_synthetic_celeba(str(root / 'files'), num=800, seed=0)
  workdir = str(root / 'classifier')
  code = cli.main(['train-classifier', '--config', 'configs/test.py', '--workdir', workdir,
                   f'--config.data.manual_dir={root / "files"}', f'--config.data.data_dir={root / "tfds"}',
                   '--config.data.image_size=32', '--config.classifier.width=16',
                   '--config.classifier.batch_size=32', '--config.classifier.num_steps=200'])
  assert code == 0
  return workdir


def test_learns_every_rendered_attribute(celeba_classifier):
  with open(os.path.join(celeba_classifier, classifier.VALIDATION_FILE)) as f:
    result = json.load(f)
  assert result['step'] == 200 and result['examples'] >= 60
  rendered = {name: result['per_attribute'][name] for name in RENDERED_ATTRIBUTES}
  assert min(rendered.values()) >= 0.9, rendered


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
