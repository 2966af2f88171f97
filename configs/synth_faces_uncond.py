"""Unconditional baseline for configs/synth_faces.py: the same model and data, no attributes.

It trains 1,000 steps on a full cosine schedule; `fdiff evaluate` compares it with
the conditional model's step-1,000 checkpoint (`fdiff export --checkpoint-step 1000`),
which is a fifteenth of the way through its own schedule, so the comparison favours the
baseline (docs/synth_faces.md).
"""

from configs import default, synth_faces


def get_config():
  config = default.unconditional(synth_faces.get_config())
  config.train.num_steps = 1000
  config.train.sample_every = 1000
  config.sample.grid_prompts = ('',)
  return config
