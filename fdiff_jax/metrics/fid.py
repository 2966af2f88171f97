"""Frechet distance between Gaussian fits of two feature sets (FID and friends).

Statistics are accumulated in float64 so millions of features sum without
loss; the matrix square root is taken in a symmetric eigen-decomposition form
that stays exact for singular covariances (few samples, dead features).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class FeatureStatistics:
  """Running sums of features, their outer products and the count, in float64."""

  total: np.ndarray | None = None
  outer: np.ndarray | None = None
  count: int = 0

  def update(self, features):
    """Adds a [B, D] batch of features."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    if self.total is None:
      self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
    self.total += x.sum(0)
    self.outer += x.T @ x
    self.count += len(x)
    return self

  def mean_and_covariance(self):
    """(mu [D], sigma [D, D]) with the unbiased (N - 1) covariance, like np.cov."""
    if self.count < 2:
      raise ValueError(f'need at least 2 features for a covariance, got {self.count}')
    mu = self.total / self.count
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma


def statistics(features):
  """(mu, sigma, count) of a [N, D] feature array."""
  return (*FeatureStatistics().update(features).mean_and_covariance(), len(features))


def trace_sqrt_product(sigma1, sigma2):
  """Tr(sqrt(S1 S2)) as the sum of sqrt(eigenvalues) of the symmetric PSD sqrt(S1) S2 sqrt(S1).

  S1 S2 has the same eigenvalues; the symmetric form needs no eps offset for
  singular covariances (fewer samples than features) and has no imaginary
  parts to drop: tiny negative eigenvalues from rounding are clipped to 0.
  """
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  return float(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64: FID for Inception features."""
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'feature statistics differ in shape: {mu1.shape} vs {mu2.shape}')
  diff = mu1 - mu2
  return float(
    diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
  )
