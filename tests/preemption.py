"""Runs an `fdiff` command in a subprocess and preempts it with SIGTERM once it trains.

`python tests/preemption.py` also measures how long `fdiff train` takes to exit
after SIGTERM (see docs/robustness.md).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from fdiff_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _preempt(args: list[str]) -> tuple[subprocess.Popen, str, float]:
  """(process, its output, seconds from SIGTERM to exit); SIGTERM at the first logged loss."""
  proc = subprocess.Popen(
    [sys.executable, '-m', 'fdiff_jax', *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 240
  for line in proc.stdout:  # Wait until training is under way, then preempt.
    if 'loss=' in line or time.time() > deadline:
      break
  start = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  return proc, out, time.perf_counter() - start


# Schedulers commonly give a preempted job 30 s between SIGTERM and SIGKILL. The
# checkpoint and the exit take 1-2 s on a 2-core CPU (docs/robustness.md); without
# the prompt exit, interpreter teardown alone took 15-42 s.
GRACE_SECONDS = 20


def sigterm_after_first_loss(args: list[str], workdir: str) -> list[int]:
  """The checkpoint steps left after SIGTERM at the first logged loss.

  The exit must be clean (code 0) and within `GRACE_SECONDS` of the signal.
  """
  proc, out, seconds = _preempt(args)
  assert proc.returncode == 0, out[-3000:]
  assert seconds < GRACE_SECONDS, f'{seconds:.1f} s from SIGTERM to exit\n{out[-3000:]}'
  manager = checkpoints.checkpoint_manager(workdir)
  try:
    return list(manager.all_steps())
  finally:
    manager.close()


def main():
  """Prints the seconds `fdiff train` (configs/test.py, synthetic CelebA) needs to exit after SIGTERM."""
  from fdiff_jax.data.synth_celeba import write_synthetic_celeba

  root = tempfile.mkdtemp(prefix='fdiff_sigterm_')
  write_synthetic_celeba(os.path.join(root, 'files'), num=20)
  for run in range(3):
    args = ['train', '--config', 'configs/test.py', '--workdir', os.path.join(root, f'w{run}')]
    args += [f'--config.data.manual_dir={root}/files', f'--config.data.data_dir={root}/tfds']
    args += [f'--config.train.{k}=100000' for k in ('num_steps', 'checkpoint_every')]
    args += ['--config.train.sample_every=100000', '--config.train.log_every=1']
    proc, _, seconds = _preempt(args)
    print(f'run {run}: exit code {proc.returncode}, {seconds:.1f} s from SIGTERM to exit')


if __name__ == '__main__':
  main()
