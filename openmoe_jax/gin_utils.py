"""t5x-style gin command-line handling shared by every openmoe_jax command.

Flags: --gin_file (repeatable; searched in --gin_search_paths, the working directory and the
package's gin/ folder), --gin.NAME=VALUE (repeatable), --gin_bindings (repeatable).
"""
import argparse
import functools
import importlib.resources
import logging
import os
import pathlib
from typing import List, Sequence

import gin

from openmoe_jax.config import ModelConfig


class UsageError(Exception):
  """A user error: the command prints one line and exits with code 2."""


class UsageValueError(UsageError, ValueError):
  """A user error that is also a ValueError (a bad setting, a mismatched saved state)."""


class UsageFileNotFoundError(UsageError, FileNotFoundError):
  """A user error that is also a FileNotFoundError (data or a model file not where configured)."""


def error_line(e: BaseException) -> str:
  """The first line of an error's message, without the `In call to configurable` lines gin
  appends to errors raised inside configurables."""
  return (str(e).splitlines() or [type(e).__name__])[0]


@functools.lru_cache(maxsize=None)
def _register():
  gin.external_configurable(ModelConfig, name="ModelConfig", module="openmoe_jax")
  # gin's package-path reader crashes (TypeError) when the first path component names a
  # namespace package, e.g. a `runs/` or `models/` folder in the working directory; treat that
  # as "not found" so the search paths are tried instead.
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "__name__", "") == "system_path_file_exists":
      def safe_exists(path, _exists=exists):
        try:
          return _exists(path)
        except TypeError:
          return False
      readers[i] = (reader, safe_exists)


def package_gin_dir() -> pathlib.Path:
  """The gin/ folder: the checkout's when running from source, else the installed copy."""
  here = pathlib.Path(__file__).resolve().parent.parent / "gin"
  if here.is_dir():
    return here
  return pathlib.Path(str(importlib.resources.files("openmoe_jax.gin_files")))


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("gin configuration")
  g.add_argument("--gin_file", action="append", default=[],
                 help="gin file to parse (repeatable); relative paths are searched in "
                      "--gin_search_paths, the current directory and the package's gin/ folder, "
                      "e.g. models/openmoe_8b.gin")
  g.add_argument("--gin_bindings", action="append", default=[],
                 help="a gin binding such as \"NUM_EXPERTS = 8\" (repeatable)")
  g.add_argument("--gin_search_paths", action="append", default=[],
                 help="extra folders (comma-separated or repeated) to search for gin files")


def split_gin_dot_flags(argv: Sequence[str]):
  """Pulls t5x's --gin.NAME=VALUE flags out of argv; returns (bindings, remaining argv)."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise UsageError(f"{arg}: expected --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return bindings, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
              finalize: bool = True) -> None:
  """Clears gin, then parses files and bindings; errors become one-line UsageErrors.

  Args:
    files: gin files, searched as described in the module docstring.
    bindings: gin bindings applied after the files.
    search_paths: extra folders (comma-separated entries allowed).
    finalize: check that every `%gin.REQUIRED` value was set (all missing ones named in one
      error) and lock the configuration. False leaves REQUIRED values to fail only if used.
  """
  _register()
  gin.clear_config()
  paths: List[str] = [p for s in search_paths for p in s.split(",") if p]
  paths += [os.getcwd(), str(package_gin_dir())]
  for p in paths:
    gin.add_config_file_search_path(p)
  for f in files:
    if not any(pathlib.Path(d, f).is_file() for d in paths) and not pathlib.Path(f).is_file():
      raise UsageError(f"gin file not found: {f} (searched {', '.join(paths)})")
  logging.disable(logging.ERROR)  # gin logs every search-path miss as an error
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False,
                                        skip_unknown=False)
    unused = unused_macros(bindings)
    if unused:
      raise UsageError("macros set but used by no gin file: " + ", ".join(unused)
                       + " (a typo? macro names are case-sensitive)")
    if finalize:
      missing = missing_required()
      if missing:
        raise UsageError("required macros not set: " + ", ".join(missing)
                         + f" (e.g. --gin.{missing[0]}=...)")
      gin.finalize()
  except (ValueError, KeyError, NameError, SyntaxError, IOError) as e:
    raise UsageError(f"gin: {error_line(e)}") from None
  finally:
    logging.disable(logging.NOTSET)


def missing_required() -> List[str]:
  """Macros (and parameters) still bound to `%gin.REQUIRED`, in parse order.

  The same test as gin's finalize hook, which stops at the first one.
  """
  # pylint: disable=protected-access  (gin has no public API for the parsed bindings)
  retrieve_constant, bindings = gin.config._retrieve_constant, gin.config._CONFIG
  missing = []
  for (scope, selector), params in bindings.items():
    for name, value in params.items():
      if (isinstance(value, gin.config.ConfigurableReference)
          and value.configurable.wrapped == retrieve_constant
          and value.scoped_configurable_fn() is gin.REQUIRED):
        key = f"{scope}/{selector}" if scope else selector
        missing.append(scope if selector == "gin.macro" else f"{key}.{name}")
  return missing


def _macro_references(value, found: set) -> None:
  """Adds the names of the macros `value` refers to (`%NAME`), recursing into containers."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.configurable.wrapped is gin.config.macro:
      found.add(value.scoped_selector.rsplit("/", 1)[0])
  elif isinstance(value, dict):
    for v in value.values():
      _macro_references(v, found)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_references(v, found)


def unused_macros(bindings: Sequence[str]) -> List[str]:
  """Macros the command-line `bindings` set (`NAME = value`) that no parsed binding uses.

  gin accepts any macro name, so `--gin.CAPACITY_MOD='dropless'` would otherwise be a silent
  no-op. Only macros set here are checked: a gin file may define macros for others to use.
  """
  # pylint: disable=protected-access  (gin has no public API for the parsed bindings)
  set_here = []
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if name and "." not in name and "/" not in name and name.isidentifier():
      set_here.append(name)
  used: set = set()
  for params in gin.config._CONFIG.values():
    for value in params.values():
      _macro_references(value, used)
  return [name for name in dict.fromkeys(set_here) if name not in used]


def model_config() -> ModelConfig:
  """ModelConfig with the parsed gin bindings; config errors become UsageErrors."""
  _register()
  try:
    return gin.get_configurable("openmoe_jax.ModelConfig")()
  except (ValueError, TypeError) as e:
    raise UsageError(error_line(e)) from None
