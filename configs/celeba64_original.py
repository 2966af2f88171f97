"""The original face-diffusion project's U-Net (64x64, channels 32,32,32,64,
attention at 32/16/8, ~1.4M parameters), for side-by-side comparison."""

from configs import celeba64
from fdiff_jax.models.unet import PRESETS


def get_config():
  config = celeba64.get_config()
  config.model.update(PRESETS['original'])
  config.model.dropout = 0.0
  config.model.dtype = 'float32'
  config.diffusion.schedule = 'linear'
  config.train.batch_size = 32
  return config
