"""Forward noising, condition dropout, targets and the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiff_jax.diffusion import (
  diffusion_loss,
  drop_condition,
  make_schedule,
  min_snr_weight,
  predict_eps_and_x0,
  q_sample,
  training_target,
)
from fdiff_jax.errors import UserError

SCHEDULE = make_schedule('linear', 100)


def _exact_model(schedule, x_star, prediction, offset=0.0, seen_t=None):
  """Optimal model for data = the single image x_star (+ offset); records t if asked."""

  def model_fn(x_t, t, attributes):
    del attributes
    if seen_t is not None:
      jax.debug.callback(lambda t: seen_t.append(np.asarray(t)), t)
    alpha = schedule.sqrt_alpha_bars[t][:, None, None, None]
    sigma = schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None]
    eps = (x_t - alpha * x_star) / sigma
    return (eps if prediction == 'eps' else alpha * eps - sigma * x_star) + offset

  return model_fn


def test_q_sample_moments():
  t = jnp.array([0, 10, 50, 99], jnp.int32)
  x0 = jnp.array([0.9, -0.5, 0.3, -1.0]).reshape(4, 1, 1, 1)
  noise = jax.random.normal(jax.random.key(0), (4, 20000, 1, 1))
  x_t = q_sample(SCHEDULE, x0, t, noise)
  ab = SCHEDULE.alpha_bars[t]
  n = noise.shape[1]
  mean_err = np.asarray(jnp.mean(x_t, axis=(1, 2, 3)) - jnp.sqrt(ab) * x0[:, 0, 0, 0])
  var = np.asarray(jnp.var(x_t, axis=(1, 2, 3)))
  assert np.all(np.abs(mean_err) < 5 * np.sqrt((1 - ab) / n))
  np.testing.assert_allclose(var, 1 - ab, rtol=5 * np.sqrt(2 / n))


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_output_conversion_inverts_the_target(prediction):
  x0 = jax.random.uniform(jax.random.key(1), (3, 4, 4, 2), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  t = jnp.array([0, 40, 99], jnp.int32)
  x_t = q_sample(SCHEDULE, x0, t, noise)
  target = training_target(SCHEDULE, x0, t, noise, prediction)
  eps, x0_hat = predict_eps_and_x0(SCHEDULE, x_t, t, target, prediction)
  np.testing.assert_allclose(eps, noise, atol=2e-4)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  if prediction == 'v':  # v = sqrt(ab) eps - sqrt(1 - ab) x0, checked at t = 99.
    ab = float(SCHEDULE.alpha_bars[99])
    np.testing.assert_allclose(
      target[2], np.sqrt(ab) * noise[2] - np.sqrt(1 - ab) * x0[2], atol=1e-6
    )


def test_drop_condition_rates():
  attrs = jnp.ones((20000, 40))
  dropped = np.asarray(drop_condition(jax.random.key(3), attrs, 0.1, 0.25))
  zero_rows = np.all(dropped == 0, axis=1)
  assert abs(zero_rows.mean() - 0.1) < 0.01
  kept_rows = dropped[~zero_rows]
  assert abs((kept_rows == 0).mean() - 0.25) < 0.005
  assert set(np.unique(dropped)) == {0.0, 1.0}


def test_drop_condition_partial_rows_keep_a_uniform_fraction():
  attrs = jnp.ones((20000, 40))
  dropped = np.asarray(drop_condition(jax.random.key(3), attrs, 0.0, 0.0, p_partial=0.5))
  kept = (dropped != 0).mean(axis=1)
  full = kept == 1.0
  assert abs(full.mean() - 0.5) < 0.02  # (a partial row keeps all 40 w.p. ~1/41)
  partial = kept[~full]
  # Keep rates u ~ U(0, 1): the fraction kept is spread evenly, mean 1/2.
  assert abs(partial.mean() - 0.5) < 0.02
  assert abs((partial < 0.25).mean() - 0.25) < 0.03
  assert ((dropped != 0).sum(axis=1) <= 3).mean() > 0.03  # 1-3 attribute prompts occur
  # Without partial rows the stream is the one p_uncond/p_attr_drop alone give.
  np.testing.assert_array_equal(
    drop_condition(jax.random.key(3), attrs, 0.1, 0.25, p_partial=0.0),
    drop_condition(jax.random.key(3), attrs, 0.1, 0.25),
  )


def test_drop_condition_keeps_values_and_passes_none():
  attrs = jax.random.uniform(jax.random.key(4), (64, 5), minval=-1, maxval=1)
  assert drop_condition(jax.random.key(5), None, 0.5, 0.5) is None
  np.testing.assert_array_equal(drop_condition(jax.random.key(5), attrs, 0.0, 0.0), attrs)
  np.testing.assert_array_equal(drop_condition(jax.random.key(5), attrs, 1.0, 0.0), 0 * attrs)


def test_min_snr_weight_values():
  snr = jnp.array([0.25, 5.0, 20.0])
  np.testing.assert_allclose(min_snr_weight(snr, 5.0, 'eps'), [1.0, 1.0, 0.25], rtol=1e-6)
  np.testing.assert_allclose(min_snr_weight(snr, 5.0, 'v'), [0.2, 5 / 6, 5 / 21], rtol=1e-6)
  # For a known t on the schedule: t = 10 has SNR well above 5.
  snr_10 = float(SCHEDULE.snr[10])
  assert snr_10 > 5
  assert float(min_snr_weight(SCHEDULE.snr[10], 5.0, 'eps')) == pytest.approx(5 / snr_10)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_exact_model_has_zero_loss(prediction):
  x_star = jax.random.uniform(jax.random.key(6), (8, 4, 4, 3), minval=-1, maxval=1)
  loss_fn = jax.jit(
    lambda offset: diffusion_loss(
      _exact_model(SCHEDULE, x_star, prediction, offset),
      SCHEDULE,
      x_star,
      None,
      jax.random.key(7),
      prediction=prediction,
    )
  )
  assert float(loss_fn(0.0)) < 1e-8
  assert float(loss_fn(0.5)) == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_min_snr_weighting_of_the_loss(prediction):
  """A unit error everywhere makes the loss the batch mean of the weights at the drawn t."""
  x_star = jax.random.uniform(jax.random.key(8), (16, 4, 4, 3), minval=-1, maxval=1)
  seen_t = []
  model_fn = _exact_model(SCHEDULE, x_star, prediction, offset=1.0, seen_t=seen_t)
  loss = jax.jit(
    lambda key: diffusion_loss(
      model_fn, SCHEDULE, x_star, None, key, prediction=prediction, min_snr_gamma=5.0
    )
  )(jax.random.key(9))
  snr = np.asarray(SCHEDULE.snr, np.float64)[seen_t[0]]
  weights = np.minimum(snr, 5.0) / (snr if prediction == 'eps' else snr + 1)
  assert len(np.unique(weights)) > 1
  assert float(loss) == pytest.approx(weights.mean(), rel=1e-4)


def test_loss_feeds_the_model_dropped_conditions():
  x0 = jnp.zeros((2000, 2, 2, 1))
  seen = []

  def model_fn(x_t, t, attributes):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), attributes)
    return jnp.zeros_like(x_t)

  loss_fn = jax.jit(lambda a, key: diffusion_loss(model_fn, SCHEDULE, x0, a, key, p_uncond=0.5))
  loss = loss_fn(jnp.ones((2000, 3)), jax.random.key(10))
  assert abs(np.all(seen[0] == 0, axis=1).mean() - 0.5) < 0.05
  assert float(loss) == pytest.approx(1.0, rel=0.05)  # E[eps^2] of a zero eps-prediction


def test_unknown_prediction_is_user_error():
  with pytest.raises(UserError, match='unknown prediction'):
    training_target(
      SCHEDULE, jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1)), 'x0'
    )
