"""`python -m fdiff_jax ...` is the same as `fdiff ...`."""

import sys

from fdiff_jax.cli import main

sys.exit(main())
