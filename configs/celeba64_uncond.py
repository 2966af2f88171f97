"""Unconditional baseline: celeba64 with no attribute input (the original
face-diffusion project's comparison of unconditional vs conditional FID)."""

from configs import celeba64


def get_config():
  config = celeba64.get_config()
  config.model.conditional = False
  config.diffusion.p_uncond = 0.0
  config.diffusion.p_attr_drop = 0.0
  config.sample.guidance = 1.0
  return config
