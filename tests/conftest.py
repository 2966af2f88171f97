"""Test setup: run JAX on CPU so the suite behaves the same on every machine, with the
XLA:CPU flags the `fdiff` command uses."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Tests import `configs.*` from the repository root, also under plain `pytest`.
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdiff_jax import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_runtime.set_xla_flags()  # Before any test starts JAX's CPU backend.
