"""Multi-host training as 2 processes x 2 CPU devices on localhost (gloo, coordinator 127.0.0.1).

One module fixture runs everything through `fdiff train`: a 1 process x 4
devices reference and an uninterrupted 2-process run (started the way users
start one, by launch/local_multiprocess.sh) side by side, then a 2-process run
that gets SIGTERM on one process, a restart that gets SIGKILL on both, and a
restart to the end. The tests check what each phase left behind. Every process
is bounded by a timeout and killed if it overruns. The phases share a JAX
compilation cache, so the later ones load the train step instead of compiling
it. The module's tests share one xdist worker (pyproject sets `--dist
loadscope`), so the fixture runs once.
"""

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import test as test_config
from fdiff_jax import checkpoints, cli, parallel
from fdiff_jax.data import pipeline
from fdiff_jax.data.synth_celeba import write_synthetic_celeba
from fdiff_jax.errors import UserError
from fdiff_jax.models import build_model
from fdiff_jax.train_state import initial_state, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30  # Room for the SIGTERM and SIGKILL phases to stop well before the end.
PHASE_TIMEOUT_S = 600  # Start-up and compilation take minutes on a busy 2-core machine.


@pytest.fixture(scope='module')
def celeba_dirs(tmp_path_factory):
  """A synthetic CelebA, prepared once here so the processes never race to prepare it."""
  root = tmp_path_factory.mktemp('celeba')
  dirs = str(root / 'files'), str(root / 'tfds')
  write_synthetic_celeba(dirs[0], num=60, seed=0)
  config = test_config.get_config()
  config.data.manual_dir, config.data.data_dir = dirs
  pipeline.num_examples(config, config.data.train_split)
  return dirs


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def train_args(celeba_dirs, workdir, num_steps, checkpoint_every):
  """`fdiff train` on configs/test.py, logging every step; a sample grid at the last step only."""
  return [
    'train',
    '--config',
    'configs/test.py',
    '--workdir',
    workdir,
    f'--config.data.manual_dir={celeba_dirs[0]}',
    f'--config.data.data_dir={celeba_dirs[1]}',
    f'--config.train.num_steps={num_steps}',
    '--config.train.keep_checkpoints=100',
    f'--config.train.checkpoint_every={checkpoint_every}',
    '--config.train.sample_every=100000',
  ]


class Job:
  """`fdiff train` as N local processes with D CPU devices each; output in log files."""

  def __init__(self, args, log_prefix, num_processes=2, devices=2):
    env = dict(  # It keeps the run's compilation cache (tests/conftest.py) for every phase.
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    )
    multihost = []
    if num_processes > 1:
      multihost = [
        '--coordinator_address',
        f'127.0.0.1:{free_port()}',
        '--num_processes',
        str(num_processes),
      ]
    self.logs = [f'{log_prefix}_{i}.log' for i in range(num_processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, 'w') as out:
        ids = ['--process_id', str(i)] if multihost else []
        self.procs.append(
          subprocess.Popen(
            [sys.executable, '-m', 'fdiff_jax', *args, *multihost, *ids],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )
    self.deadline = time.time() + PHASE_TIMEOUT_S

  def output(self, i):
    with open(self.logs[i]) as f:
      return f.read()

  def fail(self, message):
    self.kill()
    tails = '\n'.join(
      f'--- process {i} ---\n{self.output(i)[-3000:]}' for i in range(len(self.logs))
    )
    pytest.fail(f'{message}\n{tails}')

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def wait(self):
    """Return codes, once every process exited before the deadline."""
    for p in self.procs:
      try:
        p.wait(timeout=max(self.deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        self.fail(f'no exit within {PHASE_TIMEOUT_S} s')
    return [p.returncode for p in self.procs]

  def wait_for_checkpoint(self, workdir, after):
    """Blocks until a finalized checkpoint later than step `after` exists."""
    while not [s for s in checkpoint_steps(workdir) if s > after]:
      if any(p.poll() is not None for p in self.procs):
        self.fail(f'a process exited before writing a checkpoint after step {after}')
      if time.time() > self.deadline:
        self.fail(f'no checkpoint after step {after} within {PHASE_TIMEOUT_S} s')
      time.sleep(0.2)


@contextlib.contextmanager
def running(job):
  """Kills what is left of `job` on the way out, also when an assertion fails."""
  try:
    yield job
  finally:
    job.kill()


def checkpoint_steps(workdir):
  """Finalized orbax checkpoint steps (orbax renames a step's folder to its number last)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def restore_state(workdir, step):
  """The TrainState saved at `step`, restored onto one device."""
  config = checkpoints.load_config(workdir)
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  init_fn = functools.partial(initial_state, config, model, make_optimizer(config.train))
  return jax.device_get(checkpoints.load_state(workdir, init_fn, step))


def logged_losses(workdir):
  """{pid of the writing process: {step: loss}} from the TensorBoard files in `workdir`."""
  losses = {}
  for name in os.listdir(workdir):
    if name.startswith('events.out.tfevents.'):
      pid = int(name.split('.')[-3])
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag == 'loss':
            losses.setdefault(pid, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def launch_local(args, log_dir):
  """launch/local_multiprocess.sh with 2 processes, as a user runs it: its exit status and logs."""
  env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), LOG_DIR=log_dir)
  proc = subprocess.Popen(
    ['bash', os.path.join(REPO, 'launch', 'local_multiprocess.sh'), '2', *args[1:]],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    _, err = proc.communicate(timeout=PHASE_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # The script and both training processes.
    _, err = proc.communicate()
  return {'returncode': proc.returncode, 'stderr': err, 'logs': sorted(os.listdir(log_dir))}


def launcher_failure(launcher, log_dir):
  """The launcher's stderr tail and each process log's first traceback and tail."""
  parts = [launcher['stderr'][-2000:]]
  for name in launcher['logs']:
    with open(os.path.join(log_dir, name)) as f:
      text = f.read()
    start = text.find('Traceback')
    first_error = text[start : start + 3000] if start >= 0 else '(no Python traceback)'
    parts.append(f'--- {name}: first traceback ---\n{first_error}\n--- tail ---\n{text[-2000:]}')
  return '\n'.join(parts)


@pytest.fixture(scope='module')
def runs(celeba_dirs, tmp_path_factory):
  """Runs the reference, the uninterrupted and the interrupted training; returns what they left."""
  root = tmp_path_factory.mktemp('multihost')
  workdirs = {name: str(root / name) for name in ('reference', 'uninterrupted', 'interrupted')}

  def start(name, phase, num_steps=NUM_STEPS, checkpoint_every=NUM_STEPS, **processes):
    args = train_args(celeba_dirs, workdirs[name], num_steps, checkpoint_every)
    return running(Job(args, str(root / phase), **processes))

  with start('reference', 'reference', num_processes=1, devices=4) as reference:
    launcher = launch_local(
      train_args(celeba_dirs, workdirs['uninterrupted'], NUM_STEPS, NUM_STEPS),
      str(root / 'launcher_logs'),
    )
    assert launcher['returncode'] == 0, launcher_failure(launcher, str(root / 'launcher_logs'))
    assert reference.wait() == [0], reference.output(0)[-3000:]
  workdir = workdirs['interrupted']
  with start('interrupted', 'sigterm', num_steps=1000, checkpoint_every=2) as job:
    job.wait_for_checkpoint(workdir, after=0)
    job.procs[1].send_signal(signal.SIGTERM)
    sigterm = {
      'returncodes': job.wait(),
      'outputs': [job.output(i) for i in range(2)],
      'steps': checkpoint_steps(workdir),
      'pid': job.procs[0].pid,
    }
  with start('interrupted', 'sigkill', num_steps=1000, checkpoint_every=2) as job:
    job.wait_for_checkpoint(workdir, after=sigterm['steps'][-1])
    job.kill()
    sigkill = {'steps': checkpoint_steps(workdir), 'pid': job.procs[0].pid}
  with start('interrupted', 'resumed', checkpoint_every=2) as job:
    assert job.wait() == [0, 0], job.output(0)[-3000:]
    resumed = {'pid': job.procs[0].pid}
  return {
    **workdirs,
    'launcher': launcher,
    'sigterm': sigterm,
    'sigkill': sigkill,
    'resumed': resumed,
  }


def only_writer(workdir):
  """{step: loss} of the one process that logged in `workdir`."""
  losses = logged_losses(workdir)
  assert len(losses) == 1, losses.keys()
  return next(iter(losses.values()))


def test_two_processes_reproduce_the_one_process_losses(runs):
  reference, two = only_writer(runs['reference']), only_writer(runs['uninterrupted'])
  assert sorted(reference) == sorted(two) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([two[s] for s in reference], list(reference.values()), rtol=2e-5)
  assert checkpoint_steps(runs['uninterrupted']) == [NUM_STEPS]
  assert int(restore_state(runs['uninterrupted'], NUM_STEPS).step) == NUM_STEPS


def test_sigterm_to_one_process_gives_one_consistent_checkpoint_and_clean_exits(runs):
  sigterm = runs['sigterm']
  assert sigterm['returncodes'] == [0, 0], sigterm['outputs'][1][-3000:]
  stopped = [
    re.findall(r'SIGTERM: saved a checkpoint at step (\d+)', out) for out in sigterm['outputs']
  ]
  step = sigterm['steps'][-1]
  assert stopped == [[str(step)], [str(step)]], stopped  # Both agreed on the step it saved.
  assert 2 < step < 1000
  assert int(restore_state(runs['interrupted'], step).step) == step


def test_restart_after_sigkill_ends_with_the_uninterrupted_parameters(runs):
  stopped, killed = runs['sigterm']['steps'][-1], runs['sigkill']['steps'][-1]
  assert stopped < killed < NUM_STEPS
  losses = logged_losses(runs['interrupted'])
  before, after = losses[runs['sigterm']['pid']], losses[runs['resumed']['pid']]
  assert sorted(before) == list(range(1, stopped + 1))
  assert sorted(after) == list(range(killed + 1, NUM_STEPS + 1))  # Restarted at the checkpoint.
  uninterrupted = only_writer(runs['uninterrupted'])
  assert {**before, **after} == {s: uninterrupted[s] for s in [*before, *after]}
  resumed = restore_state(runs['interrupted'], NUM_STEPS)
  expected = restore_state(runs['uninterrupted'], NUM_STEPS)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_only_process_0_writes_logs_config_and_samples(runs):
  writers = {
    int(name.split('.')[-3])
    for name in os.listdir(runs['interrupted'])
    if name.startswith('events.out.tfevents.')
  }  # The writer's pid is in the name.
  process_0 = {runs[r]['pid'] for r in ('sigterm', 'sigkill', 'resumed')}
  assert {runs['sigterm']['pid'], runs['resumed']['pid']} <= writers <= process_0
  assert os.path.isfile(os.path.join(runs['interrupted'], checkpoints.CONFIG_FILE))
  samples = os.listdir(os.path.join(runs['interrupted'], 'samples'))
  assert samples == [f'step_{NUM_STEPS:07d}.png']  # Sampled on all processes, saved by one.


@pytest.fixture
def no_multihost_env(monkeypatch):
  for name in ('COORDINATOR_ADDRESS', 'NUM_PROCESSES', 'PROCESS_ID', 'LOCAL_DEVICE_IDS'):
    monkeypatch.delenv(f'FDIFF_{name}', raising=False)
  monkeypatch.delenv('SLURM_NTASKS', raising=False)


def test_a_lone_process_does_not_initialize(no_multihost_env):
  assert parallel.initialize_distributed() is False


def test_incomplete_or_inconsistent_settings_are_user_errors(no_multihost_env, monkeypatch):
  with pytest.raises(UserError, match='needs all of'):
    parallel.initialize_distributed(coordinator_address='127.0.0.1:1234')
  monkeypatch.setenv('FDIFF_NUM_PROCESSES', '2')
  monkeypatch.setenv('FDIFF_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  with pytest.raises(UserError, match='not in'):
    parallel.initialize_distributed(process_id=2)
  monkeypatch.setenv('FDIFF_PROCESS_ID', 'one')
  with pytest.raises(UserError, match='FDIFF_PROCESS_ID'):
    parallel.initialize_distributed()


def test_cli_reports_bad_multihost_flags_in_one_line(no_multihost_env, tmp_path, capsys):
  code = cli.main(
    [
      'train',
      '--config',
      'configs/test.py',
      '--workdir',
      str(tmp_path),
      '--num_processes',
      '2',
      '--process_id',
      '0',
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'coordinator_address' in err[0]


def test_launch_scripts_are_shellcheck_clean():
  scripts = [
    os.path.join(REPO, 'launch', name)
    for name in ('tpu_vm.sh', 'slurm.sbatch', 'local_multiprocess.sh')
  ]
  out = subprocess.run(
    ['shellcheck', '--shell=bash', *scripts], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stdout[-3000:]


def test_local_multiprocess_launcher_trains_two_processes(runs):
  """The script ran the uninterrupted run (exit status checked in the fixture), one log each."""
  launcher = runs['launcher']
  assert launcher['logs'] == ['process_0.log', 'process_1.log']
  assert 'started 2 processes' in launcher['stderr']
