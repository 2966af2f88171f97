"""Attribute vocabularies and the `"Smiling,-Male,Eyeglasses=0.5"` parser."""

import numpy as np
import pytest

from fdiff_jax.data import CELEBA_ATTRIBUTES, DIGIT_ATTRIBUTES, parse_attributes
from fdiff_jax.errors import UserError


def test_vocabularies_in_official_order():
  assert len(CELEBA_ATTRIBUTES) == 40 == len(set(CELEBA_ATTRIBUTES))
  assert CELEBA_ATTRIBUTES[0] == '5_o_Clock_Shadow'
  assert CELEBA_ATTRIBUTES[20] == 'Male'
  assert CELEBA_ATTRIBUTES[31] == 'Smiling'
  assert CELEBA_ATTRIBUTES[-1] == 'Young'
  assert DIGIT_ATTRIBUTES == tuple('0123456789')


def test_parse_plus_minus_and_explicit_values():
  vector = parse_attributes('Smiling,-Male,Eyeglasses=0.5', CELEBA_ATTRIBUTES)
  expected = np.zeros(40, np.float32)
  expected[CELEBA_ATTRIBUTES.index('Smiling')] = 1
  expected[CELEBA_ATTRIBUTES.index('Male')] = -1
  expected[CELEBA_ATTRIBUTES.index('Eyeglasses')] = 0.5
  assert vector.dtype == np.float32
  np.testing.assert_array_equal(vector, expected)


def test_parse_is_case_insensitive_and_tolerates_spaces():
  np.testing.assert_array_equal(
    parse_attributes(' smiling , -MALE, eyeglasses = -0.25 ', CELEBA_ATTRIBUTES),
    parse_attributes('Smiling,-Male,Eyeglasses=-0.25', CELEBA_ATTRIBUTES),
  )


def test_empty_text_is_unconditional():
  np.testing.assert_array_equal(parse_attributes('', CELEBA_ATTRIBUTES), np.zeros(40))


def test_digit_names():
  np.testing.assert_array_equal(
    parse_attributes('3,-5', DIGIT_ATTRIBUTES), [0, 0, 0, 1, 0, -1, 0, 0, 0, 0]
  )


def test_unknown_name_suggests_the_closest():
  with pytest.raises(UserError, match="unknown attribute 'Smilng'.*Smiling"):
    parse_attributes('Smilng', CELEBA_ATTRIBUTES)


@pytest.mark.parametrize(
  'text, message',
  [
    ('Smiling,-smiling', 'twice'),
    ('Male=1.5', 'outside'),
    ('Male=-2', 'outside'),
    ('Male=nan', 'outside'),
    ('Male=lots', 'not a number'),
  ],
)
def test_invalid_input_is_a_user_error(text, message):
  with pytest.raises(UserError, match=message):
    parse_attributes(text, CELEBA_ATTRIBUTES)
