"""The one exception type for mistakes a user can make and fix, and name lookups that raise it.

Library code raises `UserError("what is wrong; how to fix it")`; the CLI prints
the message as one line and exits with code 2. Everything else is a bug and
keeps its traceback.
"""

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar('T')


class UserError(ValueError):
  """A bad value from the user (flag, file, config, checkpoint); a ValueError to Python callers."""


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
  """registry[name], or a UserError naming the valid choices (the registry's keys)."""
  if name not in registry:
    raise UserError(f'unknown {what} {name!r}; use one of {", ".join(registry)}')
  return registry[name]
