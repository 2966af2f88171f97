"""Unconditional baseline for configs/synth_faces.py: the same model and data, no attributes.

It trains 1,000 steps on a full cosine schedule; `fdiff evaluate` compares it with
the conditional model's step-1,000 checkpoint (`fdiff export --checkpoint-step 1000`),
which is an eighth of the way through its own schedule, so the comparison favours the
baseline (docs/synth_faces.md).
"""

from configs import synth_faces


def get_config():
  config = synth_faces.get_config()
  config.model.conditional = False
  config.diffusion.p_uncond = 0.0
  config.diffusion.p_partial = 0.0
  config.train.num_steps = 1000
  config.train.sample_every = 1000
  config.sample.guidance = 1.0
  config.sample.grid_prompts = ('',)
  return config
