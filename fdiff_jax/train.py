"""Data-parallel diffusion training: the train step and `train_diffusion(config, workdir)`.

Reads top to bottom: state, the jitted step, sample grids, then the trainer,
which runs the shared loop (`fdiff_jax.loop`: checkpoints, exact resume,
SIGTERM, NaN stop, reporting) with a grid every `sample_every` steps.
"""

import functools
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import Mesh

from fdiff_jax import checkpoints, diffusion, images, loop, parallel
from fdiff_jax.data import attributes as attributes_lib
from fdiff_jax.data import pipeline
from fdiff_jax.models import UNet, build_model, init_once
from fdiff_jax.sampler import Sampler
from fdiff_jax.train_state import (
  TrainState,
  ema_decay,
  initial_state,
  learning_rate_schedule,
  make_optimizer,
)


def init_state(
  config: ml_collections.ConfigDict, model: UNet, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """Step 0's TrainState replicated over `mesh` (the loop makes its own; bench starts here)."""
  return init_once(functools.partial(initial_state, config, model, tx), parallel.replicated(mesh))


def train_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The key of training randomness (noise, timesteps, dropout), from the config's seed."""
  return jax.random.split(jax.random.key(config.seed))[0]


def train_step(state, batch, *, model, tx, schedule, config):
  """One optimizer step on a global batch; randomness from fold_in(seed, step)."""
  key = jax.random.fold_in(train_key(config), state.step)
  loss_key, dropout_key = jax.random.split(key)
  attrs = batch['attributes'] if config.model.conditional else None

  def loss_fn(params):
    model_fn = lambda x, t, a: model.apply(
      {'params': params}, x, t, a, train=True, rngs={'dropout': dropout_key}
    )
    d = config.diffusion
    return diffusion.diffusion_loss(
      model_fn,
      schedule,
      batch['image'],
      attrs,
      loss_key,
      prediction=d.prediction,
      min_snr_gamma=d.min_snr_gamma,
      p_uncond=d.p_uncond,
      p_attr_drop=d.p_attr_drop,
      p_partial=d.get('p_partial', 0.0),  # absent from older saved configs
    )

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(config.train, state.step)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'learning_rate': learning_rate_schedule(config.train)(state.step),
  }
  return TrainState(
    step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
  ), metrics


def jit_train_step(config, model, tx, schedule, mesh):
  """The train step jitted over `mesh`: batch sharded, state replicated and donated."""
  return jax.jit(
    functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config),
    in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
    out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
    donate_argnums=0,
  )


def grid_attributes(config, names):
  """The fixed attribute rows of training-time sample grids ('' = unconditional)."""
  prompts = tuple(config.sample.grid_prompts) if config.model.conditional else ('',)
  rows = np.stack([attributes_lib.parse_attributes(p, names) for p in prompts])
  return np.repeat(rows, config.sample.grid_size, axis=0), len(prompts)


def write_sample_grid(
  state: TrainState,
  names: Sequence[str],
  writer: metric_writers.MetricWriter,
  workdir: str,
  sampler: Sampler,
) -> None:
  """Samples the grid from the EMA params with the config's seed; PNG + TensorBoard."""
  config = sampler.config
  attrs, rows = grid_attributes(config, names)
  samples = sampler.with_params(state.ema_params).sample(attrs, seed=config.seed)
  grid = images.make_grid(images.to_uint8(samples), rows)
  step = int(state.step)
  if parallel.is_main_process():
    images.save_png(
      os.path.join(workdir, 'samples', f'step_{step:07d}.png'),
      grid,
      scale=max(1, 128 // samples.shape[1]),
    )
    writer.write_images(step, {'samples': grid[None]})


def train_diffusion(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> list[dict]:
  """Trains (or resumes) the diffusion model in `workdir`; returns the logged metrics.

  `mesh` defaults to every device of every process. Sample grids from the
  EMA parameters are written every `config.train.sample_every` steps.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  parallel.check_global_batch(config.train.batch_size, mesh)
  names = pipeline.attribute_names(config)
  model = build_model(config.model, len(names))
  tx = make_optimizer(config.train)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  init_fn = functools.partial(initial_state, config, model, tx)
  # The data and the workdir's checkpoints first: a broken dataset or a changed
  # config stops the run before the workdir is touched.
  with parallel.main_process_first('prepare_dataset'):  # Once, also on a shared data_dir.
    train_split = pipeline.open_arrays(config, config.data.train_split)
  checkpoints.check_resumable(workdir, init_fn)

  with checkpoints.workdir_lock(workdir):
    writer = loop.create_writer(workdir)
    grid_rows = len(grid_attributes(config, names)[0])
    grid_sampler = None  # Built at the first grid, then reused: it compiles once.

    def sample_grid(step, state):
      nonlocal grid_sampler
      if step % config.train.sample_every == 0 or step == config.train.num_steps:
        grid_sampler = grid_sampler or Sampler(
          config, model, state.ema_params, batch_size=grid_rows
        )
        write_sample_grid(state, names, writer, workdir, grid_sampler)

    _, history = loop.run(
      config,
      'train',
      workdir,
      init_fn,
      jit_train_step(config, model, tx, schedule, mesh),
      lambda start: pipeline.create_train_iterator(config, start_step=start, arrays=train_split),
      mesh,
      writer,
      on_step=sample_grid,
    )
  return history
