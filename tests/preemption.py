"""Runs an `fdiff` command in a subprocess and preempts it with SIGTERM once it trains."""

import os
import signal
import subprocess
import sys
import time

from fdiff_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigterm_after_first_loss(args: list[str], workdir: str) -> list[int]:
  """The checkpoint steps left after SIGTERM at the first logged loss; the exit must be clean."""
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
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  manager = checkpoints.checkpoint_manager(workdir)
  try:
    return list(manager.all_steps())
  finally:
    manager.close()
