"""Data-parallel training: the train step and `train_and_evaluate(config, workdir)`.

Reads top to bottom: model and state, the jitted step, then the loop with
orbax checkpoints (exact resume, SIGTERM), clu reporting and sample grids.
"""
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from fdiff_jax import checkpoints, diffusion, images, parallel
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline, sources
from fdiff_jax.errors import UserError
from fdiff_jax.models import build_model, init_params
from fdiff_jax.sampler import Sampler
from fdiff_jax.train_state import (TrainState, create_train_state, ema_decay,
                                   learning_rate_schedule, make_optimizer)


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


def init_state(config, model, tx, mesh):
  """Parameters initialised from the seed and the optimizer state, replicated over the mesh."""
  params = init_params(model, jax.random.key(config.seed), pipeline.image_shape(config),
                       out_sharding=parallel.replicated(mesh))
  return jax.jit(lambda p: create_train_state(p, tx), out_shardings=parallel.replicated(mesh))(params)


def seed_keys(config):
  """Independent key streams derived from the one seed in the config."""
  train_key, grid_key = jax.random.split(jax.random.key(config.seed))
  return {'train': train_key, 'grid': grid_key}


def train_step(state, batch, *, model, tx, schedule, config):
  """One optimizer step on a global batch; randomness from fold_in(seed, step)."""
  key = jax.random.fold_in(seed_keys(config)['train'], state.step)
  loss_key, dropout_key = jax.random.split(key)
  attrs = batch['attributes'] if config.model.conditional else None

  def loss_fn(params):
    model_fn = lambda x, t, a: model.apply({'params': params}, x, t, a, train=True,
                                           rngs={'dropout': dropout_key})
    d = config.diffusion
    return diffusion.diffusion_loss(model_fn, schedule, batch['image'], attrs, loss_key,
                                    prediction=d.prediction, min_snr_gamma=d.min_snr_gamma,
                                    p_uncond=d.p_uncond, p_attr_drop=d.p_attr_drop)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(config.train, state.step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': learning_rate_schedule(config.train)(state.step)}
  return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def jit_train_step(config, model, tx, schedule, mesh):
  """The train step jitted over `mesh`: batch sharded, state replicated and donated."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config),
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
      donate_argnums=0)


def grid_attributes(config, names):
  """The fixed attribute rows of training-time sample grids ('' = unconditional)."""
  prompts = tuple(config.sample.grid_prompts) if config.model.conditional else ('',)
  rows = np.stack([attributes_lib.parse_attributes(p, names) for p in prompts])
  return np.repeat(rows, config.sample.grid_size, axis=0), len(prompts)


def write_sample_grid(state, names, writer, workdir, sampler):
  """Samples the grid from the EMA params with the config's seed; PNG + TensorBoard."""
  config = sampler.config
  attrs, rows = grid_attributes(config, names)
  samples = sampler.with_params(state.ema_params).sample(attrs, seed=config.seed)
  grid = images.make_grid(images.to_uint8(samples), rows)
  step = int(state.step)
  if parallel.is_main_process():
    images.save_png(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), grid,
                    scale=max(1, 128 // samples.shape[1]))
    writer.write_images(step, {'samples': grid[None]})


class _Preemption:
  """Tells the loop at which step to checkpoint and stop after a SIGTERM.

  One process: its own SIGTERM handler. Several: JAX's preemption sync manager
  (started by `jax.distributed.initialize`) catches SIGTERM on any host and
  every process stops at the same step, one past the furthest step any had
  reached; a Python handler would replace its C++ one, so none is installed.
  """

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      self.raised = True
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, handler)
      except ValueError:  # Not the main thread: no handler.
        self._previous = None
    return self

  def reached(self, step):
    """Whether to checkpoint and stop at `step`; call it once for every step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.raised

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _ConsoleLog:
  """One readable line per log step on stdout: metrics, speed and ETA."""

  def __init__(self, start, num_steps):
    self.num_steps, self.last_step, self.last_time = num_steps, start, time.perf_counter()

  def log(self, step, summary):
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / max(rate, 1e-9)
    metrics = '  '.join(f'{k}={v:.4g}' for k, v in summary.items())
    print(f'step {step}/{self.num_steps}  {metrics}  {rate:.2f} steps/s  ETA {eta / 60:.1f} min',
          flush=True)


def _check_finite(pending, manager):
  """Stops on the first NaN/Inf loss, dropping the checkpoint whose parameters produced it.

  The loss of step s is computed from the parameters saved as step s - 1, so
  that checkpoint is not good either; earlier ones are.
  """
  for step, m in pending:
    if not np.isfinite(m['loss']):
      manager.wait_until_finished()
      for bad in [s for s in manager.all_steps() if s >= step - 1]:
        manager.delete(bad)
      good = manager.latest_step()
      kept = (f'the last good checkpoint (step {good}) is intact' if good is not None
              else 'no checkpoint was saved before it')
      raise TrainingDiverged(f'loss is {m["loss"]} at step {step}; stopped, {kept}; lower '
                             '--config.train.learning_rate or check the data')


def train_and_evaluate(config, workdir, mesh=None):
  """Trains (or resumes) in `workdir`; returns the logged metrics as a list of dicts.

  `mesh` defaults to every device of every process.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  parallel.check_global_batch(config.train.batch_size, mesh)
  names = pipeline.attribute_names(config)
  model = build_model(config.model, len(names))
  tx = make_optimizer(config.train)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  main = parallel.is_main_process()
  # The data first: a missing or broken dataset stops the run before the workdir is touched.
  with parallel.main_process_first('prepare_dataset'):  # Once, also on a shared data_dir.
    train_split = sources.open_split(config, config.data.train_split)

  state = init_state(config, model, tx, mesh)
  manager = checkpoints.checkpoint_manager(workdir, max_to_keep=config.train.keep_checkpoints)
  if manager.latest_step() is not None:
    state = checkpoints.restore(manager, checkpoints.abstract_like(state, parallel.replicated(mesh)))
    logging.info('Resumed from step %d', int(state.step))
  if main:
    checkpoints.save_config(workdir, config)
  writer = metric_writers.create_default_writer(workdir, just_logging=not main)
  start = int(state.step)
  if start == 0 and main:
    parameter_overview.log_parameter_overview(state.params)

  step_fn = jit_train_step(config, model, tx, schedule, mesh)
  grid_sampler = Sampler(config, model, state.ema_params, batch_size=len(grid_attributes(config, names)[0]))
  num_steps = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  batches = pipeline.create_train_iterator(config, start_step=start, split=train_split)

  history, pending = [], []
  console = _ConsoleLog(start, num_steps)
  try:  # Even when the loss diverges: finish pending saves so the last good one is whole.
    with _Preemption() as preemption:
      for step in range(start + 1, num_steps + 1):
        batch = parallel.global_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch)
        pending.append((step, metrics))
        report(step)
        log_now = step % config.train.log_every == 0 or step == num_steps
        preempted = preemption.reached(step)
        save_now = step % config.train.checkpoint_every == 0 or step == num_steps or preempted
        if log_now or save_now:
          pending = [(s, jax.device_get(m)) for s, m in pending]
          _check_finite(pending, manager)
        if log_now:
          summary = {k: float(np.mean([m[k] for _, m in pending])) for k in pending[0][1]}
          writer.write_scalars(step, summary)   # ReportProgress adds steps_per_sec and ETA
          if main:
            console.log(step, summary)
          history.append({'step': step, **summary})
          pending = []
        if save_now:
          checkpoints.save(manager, step, state)
        if step % config.train.sample_every == 0 or step == num_steps:
          write_sample_grid(state, names, writer, workdir, grid_sampler)
        if preempted:
          logging.warning('SIGTERM: saved a checkpoint at step %d and stopped', step)
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  return history
