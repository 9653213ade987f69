"""The errors every openmoe_jax command turns into one line, and how that line is cut.

A leaf module (no openmoe_jax imports), so any module can raise these without import cycles.
"""


class UsageError(Exception):
  """A user error: the command prints one line and exits with code 2."""


class UsageValueError(UsageError, ValueError):
  """A user error that is also a ValueError (a bad setting, a mismatched saved state)."""


class UsageFileNotFoundError(UsageError, FileNotFoundError):
  """A user error that is also a FileNotFoundError (data or a model file not where configured)."""


class TrainingError(Exception):
  """Training stopped (for example on a non-finite loss); the last good checkpoint is kept."""


def error_line(e: BaseException) -> str:
  """The first line of an error's message, without the `In call to configurable` lines gin
  appends to errors raised inside configurables."""
  return (str(e).splitlines() or [type(e).__name__])[0]
