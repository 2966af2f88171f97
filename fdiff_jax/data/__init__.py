"""Attribute vocabulary, TFDS builders, synthetic CelebA, input pipeline."""
from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES
from fdiff_jax.data.attributes import DIGIT_ATTRIBUTES
from fdiff_jax.data.attributes import parse_attributes
from fdiff_jax.data.celeba import CelebaFiles
from fdiff_jax.data.digits import SklearnDigits
from fdiff_jax.data.pipeline import attribute_names
from fdiff_jax.data.pipeline import create_eval_iterator
from fdiff_jax.data.pipeline import create_train_iterator
from fdiff_jax.data.pipeline import image_shape
from fdiff_jax.data.pipeline import num_examples
from fdiff_jax.data.pipeline import preprocess_image
from fdiff_jax.data.synth_celeba import RENDERED_ATTRIBUTES
from fdiff_jax.data.synth_celeba import render_face
from fdiff_jax.data.synth_celeba import write_synthetic_celeba
