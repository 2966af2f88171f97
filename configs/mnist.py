"""Class-conditional MNIST (TFDS `mnist`), 28x28, 10 attributes."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist'
  config.data.image_size = 28
  config.data.random_flip = False
  config.data.eval_split = 'test'

  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.1

  config.train.batch_size = 128
  config.train.num_steps = 50_000
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 1000
  config.train.ema_decay = 0.999
  config.train.checkpoint_every = 5000
  config.train.sample_every = 5000
  config.sample.guidance = 2.0
  config.sample.grid_prompts = ('',) + tuple(str(d) for d in range(10))
  return config
