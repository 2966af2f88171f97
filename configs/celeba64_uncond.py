"""Unconditional baseline: celeba64 with no attribute input (the original
face-diffusion project's comparison of unconditional vs conditional FID)."""

from configs import celeba64, default


def get_config():
  return default.unconditional(celeba64.get_config())
