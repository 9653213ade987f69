"""The errors every openmoe_jax command turns into one line, and how that line is cut.

A leaf module (no openmoe_jax imports), so any module can raise these without import cycles.
"""
import errno
from typing import Optional


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


# Errors of a full disk or an exhausted quota: the write failed, not the program.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_error(e: BaseException) -> Optional[OSError]:
  """The OSError "no space left on device" (or "disk quota exceeded") that caused `e`, if any:
  libraries (orbax, tensorstore, TensorFlow) wrap it in their own errors, so the chain of
  causes and contexts is searched, and the messages for a path-less wrapper."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return e
    text = str(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
      return OSError(errno.ENOSPC, "No space left on device")
    e = e.__cause__ or e.__context__
  return None
