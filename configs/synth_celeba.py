"""Offline face demo on the synthetic CelebA (`fdiff data synth-celeba DIR`).

Same code path as real CelebA: point --config.data.manual_dir at the folder.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeba'
  config.data.image_size = 32

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_heads = 2
  config.model.dropout = 0.0

  config.diffusion.schedule = 'cosine'
  config.diffusion.p_attr_drop = 0.1  # lets a prompt name only some attributes
  config.train.batch_size = 32
  config.train.num_steps = 4000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.train.lr_schedule = 'cosine'
  config.train.ema_decay = 0.999
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000
  config.sample.guidance = 2.0
  config.sample.grid_prompts = (
    '',
    'Male',
    '-Male',
    'Smiling',
    'Eyeglasses',
    'Blond_Hair',
    'Black_Hair',
    'Wearing_Hat',
  )
  return config
