"""Schedule values against their closed forms."""

import jax
import numpy as np
import pytest

from fdiff_jax.diffusion import make_schedule
from fdiff_jax.errors import UserError


def _as64(schedule):
  """The schedule's arrays as float64 numpy, for exact comparisons."""
  return jax.tree.map(lambda a: np.asarray(a, np.float64), schedule)


def _closed_form_betas(kind, timesteps):
  """Betas in float64 straight from the papers' definitions."""
  if kind == 'linear':
    return np.linspace(1e-4, 0.02, timesteps) * 1000 / timesteps
  t = np.arange(timesteps + 1) / timesteps
  alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


@pytest.mark.parametrize('timesteps', [1000, 250])
def test_linear_betas_span_ddpm_range_scaled_by_length(timesteps):
  s = _as64(make_schedule('linear', timesteps))
  scale = 1000 / timesteps
  assert s.betas.shape == (timesteps,)
  np.testing.assert_allclose(s.betas[[0, -1]], [1e-4 * scale, 0.02 * scale], rtol=1e-6)
  np.testing.assert_allclose(np.diff(s.betas), (0.02 - 1e-4) * scale / (timesteps - 1), rtol=1e-4)


def test_linear_alpha_bar_is_product_of_alphas():
  s = _as64(make_schedule('linear'))
  expected = np.exp(np.cumsum(np.log1p(-np.linspace(1e-4, 0.02, 1000))))
  np.testing.assert_allclose(s.alpha_bars, expected, rtol=1e-5)
  np.testing.assert_allclose(s.alphas, 1 - s.betas, rtol=1e-6)


@pytest.mark.parametrize('timesteps', [1000, 100])
def test_cosine_alpha_bar_follows_its_formula(timesteps):
  s = _as64(make_schedule('cosine', timesteps))
  t = np.arange(1, timesteps + 1) / timesteps
  formula = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  # The last beta is clipped at 0.999 (the formula reaches alpha_bar = 0 at t = 1).
  np.testing.assert_allclose(s.alpha_bars[:-1], formula[:-1], rtol=1e-5, atol=1e-12)
  assert s.betas[-1] == pytest.approx(0.999)
  assert s.betas[:-1].max() < 0.999
  assert s.alpha_bars[-1] == pytest.approx(s.alpha_bars[-2] * 0.001, rel=1e-5)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_posterior_matches_gaussian_conditioning(kind):
  """q(x_{t-1} | x_t, x0) by Bayes: precision 1/(1-ab_{t-1}) + alpha_t/beta_t, for t >= 1."""
  s = _as64(make_schedule(kind))
  betas = _closed_form_betas(kind, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  ab_prev = np.cumprod(1 - betas)[:-1]
  beta, alpha = betas[1:], 1 - betas[1:]
  variance = 1 / (1 / (1 - ab_prev) + alpha / beta)
  np.testing.assert_allclose(s.posterior_variance[1:], variance, rtol=1e-5)
  np.testing.assert_allclose(
    s.posterior_mean_coef1[1:], variance * np.sqrt(ab_prev) / (1 - ab_prev), rtol=1e-5
  )
  np.testing.assert_allclose(
    s.posterior_mean_coef2[1:], variance * np.sqrt(alpha) / beta, rtol=1e-5
  )
  # At t = 0 the posterior is the point x0.
  assert s.posterior_variance[0] == 0
  assert (s.posterior_mean_coef1[0], s.posterior_mean_coef2[0]) == (pytest.approx(1), 0)
  np.testing.assert_allclose(
    s.posterior_log_variance_clipped[1:], np.log(s.posterior_variance[1:]), rtol=1e-5
  )
  assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_snr_and_square_roots(kind):
  s = _as64(make_schedule(kind))
  ab = np.cumprod(1 - _closed_form_betas(kind, 1000))
  np.testing.assert_allclose(s.alpha_bars, ab, rtol=1e-5)
  np.testing.assert_allclose(s.snr, ab / (1 - ab), rtol=1e-5)
  np.testing.assert_allclose(s.log_snr, np.log(s.snr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s.sqrt_alpha_bars**2 + s.sqrt_one_minus_alpha_bars**2, 1, rtol=1e-6)
  assert np.all(np.diff(s.log_snr) < 0)


def test_schedule_is_a_float32_pytree_with_static_length():
  s = make_schedule('cosine', 64)
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 11 and all(leaf.dtype == np.float32 for leaf in leaves)
  assert jax.jit(lambda sched: sched.num_timesteps * sched.betas.sum())(s) > 0
  assert s.num_timesteps == 64


def test_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match='unknown noise schedule'):
    make_schedule('quadratic')
  with pytest.raises(UserError, match='at least 2'):
    make_schedule('linear', 1)
