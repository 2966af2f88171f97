"""Attribute classifier: a small ResNet that reads attributes back from images.

`fdiff evaluate` uses it to score attribute control (does a sample show the
attributes it was asked for?) and for a classifier Frechet distance on its
penultimate features, which works offline on any dataset; `fdiff edit` uses
it to read a photo's attributes. CelebA is multi-label (one sigmoid per
attribute); digits/MNIST are one class of ten (softmax).
"""

import dataclasses
import functools
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from fdiff_jax import checkpoints, loop, parallel
from fdiff_jax.batching import map_batches
from fdiff_jax.data import pipeline
from fdiff_jax.data.attributes import DIGIT_ATTRIBUTES
from fdiff_jax.errors import UserError
from fdiff_jax.metrics import fid
from fdiff_jax.train_state import make_optimizer

VALIDATION_FILE = 'validation.json'


class ResidualBlock(nn.Module):
  """Pre-activation block: (GroupNorm, ReLU, 3x3 conv) x 2 plus a shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.GroupNorm(num_groups=min(8, x.shape[-1]), name=name)
    h = nn.relu(norm('norm_1')(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.strides, name='shortcut')(h)
    h = nn.Conv(self.features, (3, 3), strides=self.strides, name='conv_1')(h)
    h = nn.relu(nn.GroupNorm(num_groups=min(8, self.features), name='norm_2')(h))
    return shortcut + nn.Conv(self.features, (3, 3), name='conv_2')(h)


class AttributeClassifier(nn.Module):
  """[B, H, W, C] in [-1, 1] -> (logits [B, A], penultimate features [B, D]).

  The last feature map is flattened, not averaged: where a feature sits
  (hat above, mustache below) matters, and it trains in a few hundred steps.
  """

  num_attributes: int
  width: int = 32
  stages: int = 3
  features: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), name='stem')(x)
    for i in range(self.stages):
      x = ResidualBlock(self.width * 2**i, strides=1 if i == 0 else 2, name=f'stage_{i}')(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(8, x.shape[-1]), name='norm')(x))
    features = nn.relu(nn.Dense(self.features, name='embed')(x.reshape(len(x), -1)))
    return nn.Dense(self.num_attributes, name='head')(features), features


@flax.struct.dataclass
class ClassifierState:
  step: jax.Array
  params: Any
  opt_state: Any


def is_one_hot(config):
  """Digits/MNIST: exactly one of the ten attributes is +1 (softmax, not sigmoids)."""
  return tuple(pipeline.attribute_names(config)) == tuple(DIGIT_ATTRIBUTES)


def build_classifier(config):
  c = config.classifier
  return AttributeClassifier(
    len(pipeline.attribute_names(config)), width=c.width, stages=c.stages, features=c.features
  )


def classification_loss(logits, attributes, one_hot):
  """Softmax cross-entropy on the +1 class, or sigmoid cross-entropies summed over attributes."""
  if one_hot:
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.argmax(attributes, -1)
    ).mean()
  return optax.sigmoid_binary_cross_entropy(logits, (attributes + 1.0) / 2.0).sum(-1).mean()


def logits_to_attributes(logits, one_hot):
  """Logits -> +-1 attributes (one-hot +-1 of the argmax for digits)."""
  if one_hot:
    return 2.0 * jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]) - 1.0
  return jnp.where(logits > 0, 1.0, -1.0)


def scored(targets, one_hot):
  """Which (image, attribute) pairs count: specified ones; for digits only the +1 class."""
  targets = np.asarray(targets)
  return targets > 0 if one_hot else targets != 0


def accuracy(predicted, targets, mask, names):
  """(mean over the scored pairs, {name: accuracy} over attributes with any scored pair)."""
  correct = (np.asarray(predicted) == np.sign(targets)) & mask
  per_attribute = {
    name: float(correct[:, i].sum() / mask[:, i].sum())
    for i, name in enumerate(names)
    if mask[:, i].any()
  }
  return float(correct.sum() / max(mask.sum(), 1)), per_attribute


def _train_step(state, batch, *, model, tx, one_hot):
  def loss_fn(params):
    logits, _ = model.apply({'params': params}, batch['image'])
    return classification_loss(logits, batch['attributes'], one_hot)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return ClassifierState(state.step + 1, params, opt_state), {'loss': loss}


def initial_state(
  config: ml_collections.ConfigDict, model: AttributeClassifier, tx: optax.GradientTransformation
) -> ClassifierState:
  """Step 0: parameters from the config's seed and a fresh optimizer state; traceable."""
  x = jnp.zeros((1,) + pipeline.image_shape(config))
  params = model.init(jax.random.key(config.seed), x)['params']
  return ClassifierState(jnp.zeros((), jnp.int32), params, tx.init(params))


def train_classifier(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> dict | None:
  """Trains (or resumes) the classifier in `workdir`; returns the validation accuracies.

  The workdir looks like a diffusion one: config.json and orbax checkpoints;
  validation accuracies go to validation.json. Stopped by SIGTERM before
  `config.classifier.num_steps`, it returns None and validates nothing.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  c = config.classifier
  parallel.check_global_batch(c.batch_size, mesh)
  model, tx, one_hot = build_classifier(config), make_optimizer(c), is_one_hot(config)
  data_config = config.copy_and_resolve_references()
  data_config.train.batch_size = c.batch_size
  step_fn = jax.jit(
    functools.partial(_train_step, model=model, tx=tx, one_hot=one_hot),
    in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
    out_shardings=parallel.replicated(mesh),
    donate_argnums=0,
  )
  init_fn = functools.partial(initial_state, config, model, tx)
  # The data (both splits) and the workdir's checkpoints first: a missing dataset or a
  # changed config stops here, before the workdir is touched.
  with parallel.main_process_first('prepare_dataset'):
    train_split = pipeline.open_arrays(config, config.data.train_split)
    pipeline.open_arrays(config, config.data.eval_split)
  checkpoints.check_resumable(workdir, init_fn)
  with checkpoints.workdir_lock(workdir):
    return _train_and_validate(config, workdir, mesh, init_fn, step_fn, data_config, train_split)


def _train_and_validate(config, workdir, mesh, init_fn, step_fn, data_config, train_split):
  """The loop, then the validation accuracies of a finished run (None if stopped early)."""
  c, one_hot = config.classifier, is_one_hot(config)
  writer = loop.create_writer(workdir)
  state, _ = loop.run(
    config,
    'classifier',
    workdir,
    init_fn,
    step_fn,
    lambda start: pipeline.create_train_iterator(data_config, start_step=start, arrays=train_split),
    mesh,
    writer,
  )
  step = int(state.step)
  if step < c.num_steps:
    return None
  model = build_classifier(config)
  classifier = Classifier(workdir, config, model, jax.device_get(state.params), step)
  predicted, targets, _ = classifier.run_on_split(config)
  mean, per_attribute = accuracy(
    predicted, targets, scored(targets, one_hot), pipeline.attribute_names(config)
  )
  result = {
    'step': step,
    'split': config.data.eval_split,
    'examples': len(targets),
    'accuracy': mean,
    'per_attribute': per_attribute,
  }
  writer.write_scalars(step, {'val_accuracy': mean})
  writer.flush()
  if parallel.is_main_process():
    with open(os.path.join(workdir, VALIDATION_FILE), 'w') as f:
      json.dump(result, f, indent=2)
  logging.info('validation accuracy %.4f on %d examples', mean, len(targets))
  return result


def format_accuracy(result):
  """Validation accuracies as text: the mean, then one line per attribute."""
  lines = [
    f'validation accuracy {result["accuracy"]:.4f} on {result["examples"]} '
    f'{result["split"]} images (step {result["step"]})'
  ]
  lines += [f'  {name:<20} {acc:.4f}' for name, acc in result['per_attribute'].items()]
  return '\n'.join(lines)


@dataclasses.dataclass
class Classifier:
  """A trained classifier, ready to apply to [-1, 1] images of any size."""

  workdir: str
  config: Any
  model: AttributeClassifier
  params: Any
  step: int

  @property
  def attribute_names(self):
    return tuple(pipeline.attribute_names(self.config))

  @property
  def one_hot(self):
    return is_one_hot(self.config)

  @functools.cached_property
  def _apply(self):
    """Jitted images -> (+-1 attributes, features), resizing to the training size."""
    h, w, c = pipeline.image_shape(self.config)

    def apply(params, x):
      if x.shape[1:3] != (h, w):
        x = jax.image.resize(x, (x.shape[0], h, w, c), 'bilinear', antialias=True)
      logits, features = self.model.apply({'params': params}, x)
      return logits_to_attributes(logits, self.one_hot), features

    return jax.jit(apply)

  def __call__(self, images, batch_size=256):
    """[N, H, W, C] in [-1, 1] -> (+-1 attributes [N, A], features [N, D]) as numpy."""
    images = np.asarray(images, np.float32)
    channels = pipeline.image_shape(self.config)[-1]
    if images.ndim != 4 or images.shape[-1] != channels:
      raise UserError(
        f'the classifier reads [N, H, W, {channels}] images, got {images.shape}; '
        'was it trained on the same dataset as the diffusion model?'
      )
    return map_batches(
      lambda _, x: self._apply(self.params, x), (images,), min(batch_size, len(images))
    )

  def run_on_split(self, config, split=None, transform=None, batch_size=256):
    """One pass over a split of `config`'s data: (predicted, targets, FeatureStatistics).

    `transform` maps each [-1, 1] image batch first (e.g. a uint8 round-trip).
    """
    predicted, targets, stats = [], [], fid.FeatureStatistics()
    for batch in pipeline.create_eval_iterator(config, split, batch_size):
      if len(batch['image']):
        x = transform(batch['image']) if transform else batch['image']
        p, features = self(x, batch_size)
        predicted.append(p)
        targets.append(batch['attributes'])
        stats.update(features)
    return np.concatenate(predicted), np.concatenate(targets), stats


def load_classifier(classifier_dir, step=None):
  """The classifier trained in `classifier_dir` (latest checkpoint unless `step`)."""
  config = checkpoints.load_config(classifier_dir)  # Restoring checks it holds a classifier.
  model, tx = build_classifier(config), make_optimizer(config.classifier)
  init_fn = functools.partial(initial_state, config, model, tx)
  state = checkpoints.load_state(classifier_dir, init_fn, step)
  return Classifier(classifier_dir, config, model, state.params, int(state.step))


def predict_attributes(classifier_dir, images):
  """+-1 attributes [B, A] of [B, H, W, C] images in [-1, 1], by the classifier in a dir."""
  return load_classifier(classifier_dir)(images)[0]


def features(classifier_dir, images):
  """Penultimate-layer features [B, D] of images in [-1, 1], by the classifier in a dir."""
  return load_classifier(classifier_dir)(images)[1]
