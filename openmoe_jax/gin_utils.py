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
import re
from typing import Any, Dict, List, Sequence

import gin
from gin import config_parser

from openmoe_jax.model import partitioning
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.errors import (UsageError, UsageFileNotFoundError,  # noqa: F401  re-exported
                                UsageValueError, error_line)
from openmoe_jax.model import config as config_lib


@functools.lru_cache(maxsize=None)
def _register():
  gin.external_configurable(ModelConfig, name="ModelConfig", module="openmoe_jax")
  gin.external_configurable(partitioning.axis_rules, name="axis_rules",
                            module="openmoe_jax.partitioning")
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
  except SyntaxError as e:
    raise UsageError(f"gin: {_syntax_error_line(e, files, paths)}") from None
  except (ValueError, KeyError, NameError, IOError) as e:
    raise UsageError(f"gin: {error_line(e)}") from None
  finally:
    logging.disable(logging.NOTSET)
  user_unused = unused_user_macros(files, paths)
  if user_unused:
    raise UsageError("macros set but used by no gin file: " + ", ".join(user_unused)
                     + " (a typo? macro names are case-sensitive)")


class _Statements(config_parser.ParserDelegate):
  """Reads a gin file's statements without evaluating references (no configurables needed)."""

  def configurable_reference(self, scoped_name, evaluate):
    return scoped_name

  def macro(self, name):
    return name


def _resolve(name: str, paths: Sequence[str], relative_to: str = "") -> str:
  """The file gin reads for `name` (as given, next to the including file, or on the paths)."""
  for candidate in ([name, os.path.join(relative_to, name)] if relative_to else [name]):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  for d in paths:
    if os.path.isfile(os.path.join(d, name)):
      return os.path.abspath(os.path.join(d, name))
  return ""


def _user_files(files: Sequence[str], paths: Sequence[str]) -> List[str]:
  """The given gin files and what they include, outside the package's own gin/ folder."""
  ours = str(package_gin_dir().resolve()) + os.sep
  seen: List[str] = []
  todo = [_resolve(f, paths) for f in files]
  while todo:
    path = todo.pop(0)
    if not path or path in seen or os.path.realpath(path).startswith(ours):
      continue
    seen.append(path)
    try:
      statements = list(config_parser.ConfigParser(pathlib.Path(path).read_text(), _Statements()))
    except SyntaxError:
      continue  # reported by gin's own parse
    todo += [_resolve(st.filename, paths, os.path.dirname(path)) for st in statements
             if isinstance(st, config_parser.IncludeStatement)]
  return seen


def unused_user_macros(files: Sequence[str], paths: Sequence[str]) -> List[str]:
  """`NAME (file:line)` for each macro a user's own gin file sets that no parsed binding uses.

  The project's gin files may define macros for others to use, so only files outside the
  package's gin/ folder are checked (the command line is checked by `unused_macros`).
  """
  used: set = set()
  for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      _macro_references(value, used)
  out = []
  for path in _user_files(files, paths):
    for st in config_parser.ConfigParser(pathlib.Path(path).read_text(), _Statements()):
      if (isinstance(st, config_parser.BindingStatement) and not st.arg_name and not st.scope
          and "." not in st.selector and st.selector not in used):
        out.append(f"{st.selector} ({os.path.basename(path)}:{st.location.line_num})")
  return out


def _syntax_error_line(e: SyntaxError, files: Sequence[str], paths: Sequence[str]) -> str:
  """`file:line: what` for a gin syntax error: gin names neither the file nor, for an unclosed
  bracket, the right line (it reports where the parse gave up)."""
  for path in [p for p in (_resolve(f, paths) for f in files) if p] + _user_files(files, paths):
    try:
      list(config_parser.ConfigParser(pathlib.Path(path).read_text(), _Statements()))
    except SyntaxError as err:
      where = f"{path}:{err.lineno}" if err.lineno else path
      text = " ".join(str(err).split())
      hint = (" (an unclosed bracket or quote before this line?)"
              if any(w in text for w in ("malformed node", "EOF", "Expected")) else "")
      token = re.search(r"Failed to parse token '([^']*)'", text)
      what = f"cannot parse {token.group(1)!r}" if token else error_line(err)
      return f"{where}: syntax error, {what}{hint}"
  return error_line(e)


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


def _macro_fields() -> dict:
  """{model macro: ModelConfig field} as gin/models/architecture.gin binds them."""
  text = (package_gin_dir() / "models" / "architecture.gin").read_text()
  out = {}
  for st in config_parser.ConfigParser(text, _Statements()):
    if (isinstance(st, config_parser.BindingStatement) and st.selector == "ModelConfig"
        and isinstance(st.value, str)):
      out[st.value.lstrip("%")] = st.arg_name
  return out


def model_overrides(bindings: Sequence[str]) -> Dict[str, Any]:
  """Gin bindings of a saved model's settings -> {ModelConfig field: typed value}.

  Accepts what a t5x user writes for a model: a model macro (`EVAL_EXPERT_CAPACITY_FACTOR =
  2.0`, the names of gin/models/*.gin) or `ModelConfig.FIELD = VALUE`. The tools that read a
  trained MODEL_DIR (openmoe-score, -analyze, -infer) take these as `--gin.NAME=VALUE`. Values
  are typed by the field (`config.field_value`).
  """
  import ast  # pylint: disable=g-import-not-at-top
  fields = _macro_fields()
  out = {}
  for b in bindings:
    m = re.fullmatch(r"\s*(?:openmoe_jax\.)?(?:ModelConfig\.)?(\w+)\s*=\s*(.+?)\s*", b,
                     re.S)
    name = m and (fields.get(m.group(1)) or (m.group(1) if "ModelConfig" in b else None))
    if not name:
      raise UsageError(f"unsupported gin binding {b!r}: use a model macro (e.g. "
                       "EVAL_EXPERT_CAPACITY_FACTOR = 2.0) or ModelConfig.FIELD = VALUE")
    try:
      value = ast.literal_eval(m.group(2))
    except (ValueError, SyntaxError):
      value = m.group(2)  # a bare word: the text itself (a str field, or true/false)
    try:
      out[name] = config_lib.field_value(name, value)
    except ValueError as e:
      raise UsageError(f"{b.strip()}: {error_line(e)}") from None
  return out


def partitioning_rules() -> tuple:
  """The partitioning rules with the parsed gin bindings
  (`openmoe_jax.partitioning.axis_rules.overrides`); a bad override is a UsageError."""
  _register()
  try:
    return gin.get_configurable("openmoe_jax.partitioning.axis_rules")()
  except ValueError as e:
    raise UsageError(error_line(e)) from None


def model_config() -> ModelConfig:
  """ModelConfig with the parsed gin bindings; config errors become UsageErrors."""
  _register()
  try:
    return gin.get_configurable("openmoe_jax.ModelConfig")()
  except (ValueError, TypeError) as e:
    raise UsageError(error_line(e)) from None
