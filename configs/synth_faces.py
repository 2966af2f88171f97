"""Attribute-conditional faces on the synthetic CelebA, trained on a 2-core CPU.

`fdiff data synth-celeba data/synth_faces --num 20000` writes the data in the
official CelebA layout; point --config.data.manual_dir at it. The model in
pretrained/synth-faces was trained with this config (docs/synth_faces.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeba'
  config.data.manual_dir = 'data/synth_faces'
  config.data.image_size = 32

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_heads = 2
  config.model.dropout = 0.0

  config.diffusion.schedule = 'cosine'
  config.diffusion.prediction = 'v'
  config.diffusion.min_snr_gamma = 5.0
  config.diffusion.p_uncond = 0.1
  config.diffusion.p_partial = 0.3  # prompts that name 1-3 attributes are in-distribution
  config.train.batch_size = 32
  config.train.num_steps = 15000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.train.lr_schedule = 'cosine'
  config.train.ema_decay = 0.999
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.sample_every = 4000
  config.sample.guidance = 3.0
  config.sample.grid_prompts = (
    '',
    'Male',
    '-Male',
    'Smiling',
    'Eyeglasses',
    'Blond_Hair',
    'Gray_Hair',
    'Wearing_Hat',
    'Male,Mustache',
    '-Male,Wearing_Lipstick,Bangs',
  )
  return config
