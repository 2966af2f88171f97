"""Tiny config for the test suite: synthetic CelebA at 16x16, a very small U-Net."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeba'  # tests set data.manual_dir / data.data_dir
  config.data.image_size = 16

  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_heads = 2
  config.model.dropout = 0.1

  config.diffusion.timesteps = 100
  config.train.batch_size = 8
  config.train.num_steps = 6
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 2
  config.train.ema_decay = 0.99
  config.train.log_every = 1
  config.train.checkpoint_every = 3
  config.train.sample_every = 6

  config.sample.steps = 4
  config.sample.grid_size = 2
  config.sample.grid_prompts = ('', 'Male', 'Smiling,-Male')
  return config
