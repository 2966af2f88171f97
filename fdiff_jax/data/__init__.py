"""Attribute vocabulary, TFDS builders, synthetic CelebA, input pipeline."""

from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES, DIGIT_ATTRIBUTES, parse_attributes
from fdiff_jax.data.celeba import CelebaFiles
from fdiff_jax.data.digits import SklearnDigits
from fdiff_jax.data.pipeline import (
  attribute_names,
  create_eval_iterator,
  create_train_iterator,
  image_shape,
  num_examples,
  preprocess_image,
)
from fdiff_jax.data.synth_celeba import RENDERED_ATTRIBUTES, render_face, write_synthetic_celeba
