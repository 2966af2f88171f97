"""Frechet distance against a scipy reference, closed forms, and streaming statistics."""

import numpy as np
import pytest
import scipy.linalg

from fdiff_jax.metrics import fid


def scipy_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The classic TTUR / pytorch-fid formula: scipy sqrtm with the eps * I fix-up."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(sigma1)) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def random_features(seed, n, d, shift=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


@pytest.mark.parametrize('d', [8, 64])
def test_agrees_with_scipy_reference(d):
  a, b = random_features(0, 500, d), random_features(1, 400, d, shift=0.2)
  mu1, s1, _ = fid.statistics(a)
  mu2, s2, _ = fid.statistics(b)
  expected = scipy_reference(mu1, s1, mu2, s2)
  assert expected > 1.0
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-6)


def test_a_set_against_itself_is_zero_and_distance_is_symmetric():
  a, b = random_features(2, 300, 32), random_features(3, 300, 32, shift=0.5)
  sa, sb = fid.statistics(a)[:2], fid.statistics(b)[:2]
  assert abs(fid.frechet_distance(*sa, *sa)) < 1e-8 * np.trace(sa[1])
  ab, ba = fid.frechet_distance(*sa, *sb), fid.frechet_distance(*sb, *sa)
  assert ab > 1.0
  np.testing.assert_allclose(ab, ba, rtol=1e-10)


def test_known_value_for_two_gaussians():
  # Commuting covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(5, 5)))[0]
  a, b = np.array([1.0, 2.0, 3.0, 4.0, 0.5]), np.array([4.0, 1.0, 1.0, 9.0, 0.5])
  s1, s2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
  mu1, mu2 = np.zeros(5), np.array([1.0, -2.0, 0.0, 0.0, 3.0])
  expected = 14.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-10)


def test_singular_covariances_fewer_samples_than_features():
  a, b = random_features(5, 10, 40), random_features(6, 12, 40, shift=0.1)
  mu1, s1, _ = fid.statistics(a)
  mu2, s2, _ = fid.statistics(b)
  assert np.linalg.matrix_rank(s1) < 40
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(value) and value > 0
  offset = np.eye(40) * 1e-6  # The eps-offset answer, which is well defined.
  np.testing.assert_allclose(value, scipy_reference(mu1, s1 + offset, mu2, s2 + offset), rtol=1e-4)


def test_streaming_statistics_equal_numpy():
  x = random_features(7, 250, 16, shift=3.0).astype(np.float32)
  stats = fid.FeatureStatistics()
  for start in range(0, 250, 64):
    stats.update(x[start : start + 64])
  mu, sigma = stats.mean_and_covariance()
  assert stats.count == 250
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(
    sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12
  )
  with pytest.raises(ValueError, match='at least 2'):
    fid.FeatureStatistics().update(x[:1]).mean_and_covariance()
