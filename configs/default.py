"""Default config: every field any variant may override lives here.

Variants import this module, call `get_config()` and override a few fields.
Override from the command line with `--config.train.batch_size=64`.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Input pipeline (fdiff_jax/data). `dataset` is one of:
  #   digits      scikit-learn's bundled 8x8 handwritten digits (offline), 10 attributes
  #   mnist       TFDS mnist, 10 attributes
  #   celeba      CelebA from files you downloaded (official or Kaggle layout) in manual_dir
  #   celeb_a     TFDS's own celeb_a (for users whose Google Drive download works)
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'celeba'
  data.manual_dir = ''  # folder with img_align_celeba.zip + list_attr_celeba.txt + ...
  data.data_dir = ''  # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
  data.image_size = 64
  data.random_flip = True
  data.train_split = 'train'
  data.eval_split = 'validation'

  # U-Net (fdiff_jax/models/unet.py). The attribute count comes from the dataset.
  config.model = model = ml_collections.ConfigDict()
  model.conditional = True  # False: unconditional baseline (no attribute input)
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16, 8)
  model.num_heads = 4
  model.dropout = 0.1
  model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU
  model.param_dtype = 'float32'
  # GroupNorm and attention (fdiff_jax/models/kernels.py): 'cpu' | 'xla', or
  # 'auto' for 'cpu' on a CPU backend, else 'xla'. Same parameters either way.
  model.kernels = 'auto'

  # Diffusion process and loss (fdiff_jax/diffusion).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'linear'  # 'linear' (DDPM) | 'cosine' (improved DDPM)
  diffusion.timesteps = 1000
  diffusion.prediction = 'eps'  # 'eps' | 'v'
  diffusion.min_snr_gamma = 0.0  # 0 = plain MSE; 5 is the paper's choice
  diffusion.p_uncond = 0.1  # drop the whole attribute vector (CFG)
  diffusion.p_attr_drop = 0.0  # drop each attribute independently
  diffusion.p_partial = 0.0  # rows keeping a random subset of attributes (losses.drop_condition)

  # Optimisation, checkpoints, reporting (fdiff_jax/train.py).
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # global, over all devices of all processes
  train.num_steps = 500_000
  train.learning_rate = 2e-4
  train.warmup_steps = 5000
  train.lr_schedule = 'constant'  # 'constant' | 'cosine'
  train.weight_decay = 0.0
  train.grad_clip = 1.0
  train.ema_decay = 0.9999
  train.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step))
  train.log_every = 100
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3
  train.sample_every = 10000

  # Sampling defaults, used for training-time grids and by `fdiff sample`.
  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = 'dpm++'  # 'ddpm' | 'ddim' | 'dpm++'
  sample.steps = 25
  sample.eta = 0.0
  sample.guidance = 2.0
  sample.grid_size = 8  # samples per attribute row in training grids
  # One grid row per prompt ('' = unconditional), in the `fdiff sample` syntax.
  sample.grid_prompts = (
    '',
    'Male',
    '-Male',
    'Smiling,Male',
    'Smiling,-Male',
    'Eyeglasses',
    'Blond_Hair,-Male',
    'Black_Hair,Male,Mustache',
  )

  # Attribute classifier for `fdiff evaluate` (fdiff_jax/classifier.py): a small
  # ResNet on the same pipeline. Optimizer, logging and checkpoint fields mean
  # what they do in `train`.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.width = 32  # channels of the first stage, doubled per stage
  classifier.stages = 3  # residual stages; each after the first halves H, W
  classifier.features = 128  # penultimate width: the classifier Frechet distance's features
  classifier.batch_size = 64
  classifier.num_steps = 3000
  classifier.learning_rate = 2e-3
  classifier.warmup_steps = 100
  classifier.lr_schedule = 'cosine'
  classifier.weight_decay = 1e-4
  classifier.grad_clip = 1.0
  classifier.log_every = 100
  classifier.checkpoint_every = 1000
  classifier.keep_checkpoints = 2
  return config


def unconditional(config):
  """`config`'s unconditional baseline: no attribute input, no condition dropout, w = 1."""
  config.model.conditional = False
  config.diffusion.update(p_uncond=0.0, p_attr_drop=0.0, p_partial=0.0)
  config.sample.guidance = 1.0
  return config
