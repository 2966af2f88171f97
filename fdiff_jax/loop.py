"""The training loop every trainer runs: `run(config, section, workdir, ...)`.

One loop for the diffusion model and the classifier, so both get the same
exact resume from the latest orbax checkpoint, checkpoint on SIGTERM, stop on
a NaN/Inf loss, and clu plus console progress. A trainer brings its state's
init function, a jitted step and its batches; `config[section]` says how long
to train and how often to log and checkpoint.
"""

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fdiff_jax import checkpoints, parallel
from fdiff_jax.errors import UserError
from fdiff_jax.models import init_once


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard files in `workdir` plus the log on process 0; the log alone elsewhere."""
  return metric_writers.create_default_writer(workdir, just_logging=not parallel.is_main_process())


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
    print(
      f'step {step}/{self.num_steps}  {metrics}  {rate:.2f} steps/s  ETA {eta / 60:.1f} min',
      flush=True,
    )


def _check_finite(pending, manager, section):
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
      kept = (
        f'the last good checkpoint (step {good}) is intact'
        if good is not None
        else 'no checkpoint was saved before it'
      )
      raise TrainingDiverged(
        f'loss is {m["loss"]} at step {step}; stopped, {kept}; lower '
        f'config.{section}.learning_rate or check the data'
      )


def _start(manager, init_fn, sharding, workdir):
  """The latest good checkpoint's state if there is one, else `init_fn()`; replicated.

  A damaged step (see `checkpoints.restore`) is moved to WORKDIR/damaged_checkpoints
  and the step before it is tried, so a run resumes without anyone deleting files.
  """
  abstract = checkpoints.abstract_state(init_fn, sharding)
  while (step := manager.latest_step()) is not None:
    try:
      state = checkpoints.restore(manager, abstract, step)
    except checkpoints.DamagedCheckpoint as e:
      moved = checkpoints.set_aside(manager, step, workdir)
      logging.warning('%s; moved it to %s, resuming from an earlier checkpoint if any', e, moved)
      continue
    logging.info('Resumed from step %d', int(state.step))
    return state
  return init_once(init_fn, sharding)


def run(
  config: ml_collections.ConfigDict,
  section: str,
  workdir: str,
  init_fn: Callable[[], Any],
  step_fn: Callable[[Any, Any], tuple[Any, dict]],
  batches: Callable[[int], Iterator[dict]],
  mesh: Mesh,
  writer: metric_writers.MetricWriter,
  on_step: Callable[[int, Any], None] | None = None,
) -> tuple[Any, list[dict]]:
  """Trains to `config[section].num_steps` in `workdir`, resuming where its checkpoints stop.

  `init_fn()` makes step 0's state (with `step` and `params` fields);
  `step_fn(state, global batch)` returns the next state and metrics with a
  'loss'; `batches(start_step)` yields this process's batches from a step on;
  `on_step(step, state)` runs after each step. Returns the last state and the
  logged metric means as a list of dicts, one per log step.
  """
  c = config[section]
  main = parallel.is_main_process()
  manager = checkpoints.checkpoint_manager(workdir, max_to_keep=c.keep_checkpoints)
  state = _start(manager, init_fn, parallel.replicated(mesh), workdir)
  start = int(state.step)
  if main:
    checkpoints.save_config(workdir, config)
    if start == 0:
      parameter_overview.log_parameter_overview(state.params)
  data = batches(start)
  report = periodic_actions.ReportProgress(num_train_steps=c.num_steps, writer=writer)
  console = _ConsoleLog(start, c.num_steps)
  history, pending = [], []
  unsealed = False  # A save was started whose step has no manifest yet.
  try:  # Even when the loss diverges: finish pending saves so the last good one is whole.
    with _Preemption() as preemption:
      for step in range(start + 1, c.num_steps + 1):
        batch = parallel.global_batch(next(data), mesh)
        if step == start + 1:
          parallel.compile_together(f'{section}_step_compiled', step_fn, state, batch)
        state, metrics = step_fn(state, batch)
        pending.append((step, metrics))
        report(step)
        last = step == c.num_steps
        log_now = step % c.log_every == 0 or last
        preempted = preemption.reached(step)
        save_now = step % c.checkpoint_every == 0 or last or preempted
        if log_now or save_now:
          pending = [(s, jax.device_get(m)) for s, m in pending]
          _check_finite(pending, manager, section)
        if save_now:
          checkpoints.save(manager, step, state)
          unsealed = True
        elif unsealed and not manager.is_saving_in_progress():
          checkpoints.write_manifests(manager)  # Sealed as soon as the save is committed.
          unsealed = False
        if log_now:
          summary = {k: float(np.mean([m[k] for _, m in pending])) for k in pending[0][1]}
          writer.write_scalars(step, summary)  # ReportProgress adds steps_per_sec and ETA.
          if main:
            console.log(step, summary)
          history.append({'step': step, **summary})
          pending = []
        if on_step is not None:
          on_step(step, state)
        if preempted:
          logging.warning('SIGTERM: saved a checkpoint at step %d and stopped', step)
          break
  finally:
    manager.wait_until_finished()
    checkpoints.write_manifests(manager)
    manager.close()
    writer.flush()
    if hasattr(data, 'close'):
      data.close()  # Released in the background: the command may exit right away.
  return state, history
