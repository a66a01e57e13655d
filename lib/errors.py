"""User-facing error classes: bad input that a user can fix, told apart from bugs.

`lib.cli.run` prints a `UserError` as one line `error: <message>` with exit code 2 and keeps the
traceback of every other exception (a bug). Each subclass also derives from the builtin a caller
would catch before (ValueError, FileNotFoundError), so existing `except` clauses keep working; a
user error is never raised as a bare builtin that a bug could raise too.
"""


class UserError(Exception):
  """Bad user input: a config value, a file, a model source, a resume mismatch, a refused output.

  The message names the config key, file (and line) or parameter and says what was expected.
  """


class ConfigError(UserError, ValueError):
  """A config value or key is invalid (`config.optim.lr=-0.001: must be > 0`)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or that a named directory must hold) does not exist."""


class CorruptFileError(UserError, ValueError):
  """A file exists but cannot be read: truncated, corrupt or of another format (names the path)."""


class ModelSourceError(UserError, ValueError):
  """A model source (HF dir, our model dir, run workdir) that this workbench cannot use."""
