"""Test setup: run JAX on CPU so the suite behaves the same on every machine, with the
XLA:CPU flags the `fdiff` command uses."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent XLA compilation cache for the run: many tests, their xdist workers (which
# inherit this environment) and the processes they start compile the same tiny programs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='fdiff-jax-tests-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

# Tests import `configs.*` from the repository root, also under plain `pytest`.
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdiff_jax import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_runtime.set_xla_flags()  # Before any test starts JAX's CPU backend.
