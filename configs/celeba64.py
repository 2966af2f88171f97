"""Recommended attribute-conditional CelebA 64x64 model for GPU/TPU (~40M parameters).

Architecture: DDPM's U-Net (Ho et al. 2020) with a 4th level for 64x64.
Cosine schedule: improved DDPM (Nichol & Dhariwal 2021), which helps at 64x64.
Learning rate 1e-4, batch 128, EMA 0.9999, grad clip 1, dropout 0.1: DDPM /
improved DDPM. Condition dropout p_uncond = 0.1 (Ho & Salimans 2022, CFG),
plus per-attribute dropout so a prompt may name only some attributes.
"""

from configs import default
from fdiff_jax.models.unet import PRESETS


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeba'  # --config.data.manual_dir=/path/to/celeba
  config.data.image_size = 64
  config.model.update(PRESETS['celeba64'])
  config.model.dropout = 0.1
  config.model.dtype = 'bfloat16'
  config.diffusion.schedule = 'cosine'
  config.diffusion.p_uncond = 0.1
  config.diffusion.p_attr_drop = 0.1
  config.train.batch_size = 128
  config.train.num_steps = 300_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 5000
  config.train.ema_decay = 0.9999
  config.train.grad_clip = 1.0
  config.train.checkpoint_every = 5000
  config.train.sample_every = 10_000
  config.sample.guidance = 2.0
  return config
