"""The one exception type for mistakes a user can make and fix.

Library code raises `UserError("what is wrong; how to fix it")`; the CLI prints
the message as one line and exits with code 2. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input (flags, files, config, checkpoint)."""
