"""Diffusion core: noise schedules, training loss, solvers and DDIM inversion (pure JAX)."""

from fdiff_jax.diffusion.losses import (
  PREDICTIONS,
  diffusion_loss,
  drop_condition,
  min_snr_weight,
  predict_eps_and_x0,
  q_sample,
  training_target,
)
from fdiff_jax.diffusion.schedules import SCHEDULES, Schedule, make_schedule
from fdiff_jax.diffusion.solvers import (
  SAMPLERS,
  ddim_invert,
  ddim_sample,
  ddim_sigma,
  ddpm_sample,
  dpmpp_2m_sample,
  guided_output,
  sample,
  sampling_timesteps,
)
