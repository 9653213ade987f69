"""What the three launch scripts share: argument splitting, one-line errors, printing commands.

A launcher's own flags come first; openmoe-train's flags follow `--` (and `--gin...` flags may
also appear before it). Standard library only, so the scripts run before openmoe_jax is installed.
"""
import argparse
import pathlib
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Set by the launchers themselves; given again after `--` they would contradict them.
OWNED_FLAGS = ("--coordinator_address", "--process_count", "--process_index")


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `prog: error: message` on stderr, exit code 2."""

  def __init__(self, prog: str, doc: str):
    super().__init__(prog=prog, description=doc, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    self.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands (one per line) and run nothing")

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def parse(parser: Parser, argv: Optional[Sequence[str]] = None,
          owned: Sequence[str] = OWNED_FLAGS) -> Tuple[argparse.Namespace, List[str]]:
  """Splits argv into (launcher args, openmoe-train args) and checks the openmoe-train args.

  openmoe-train args: everything after the first `--`, preceded by the `--gin...` flags found
  before it. Any other unknown flag is an error, so a mistyped launcher flag never reaches a
  remote machine.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args, unknown = parser.parse_known_args(argv[:split])
  stray = [a for a in unknown if not a.startswith("--gin")]
  if stray:
    parser.error("unrecognized arguments: " + " ".join(stray)
                 + " (openmoe-train flags go after --)")
  train_args = unknown + argv[split + 1:]
  if not any(a.startswith("--gin_file") for a in train_args):
    parser.error("no openmoe-train --gin_file: put openmoe-train's flags after --, "
                 "e.g. -- --gin_file=quickstart.gin")
  for a in train_args:
    name = a.split("=", 1)[0]
    if name in owned:
      parser.error(f"{name} is set by this launcher; remove it from the openmoe-train flags")
  return args, train_args


def quote(arg: str) -> str:
  """shlex.quote, except that gin strings become "--gin.X='v'" rather than '--gin.X='"'"'v'..."""
  if "'" in arg and not any(c in arg for c in '"$`\\!'):
    return f'"{arg}"'
  return shlex.quote(arg)


def join(cmd: Sequence[str]) -> str:
  """A command as one shell line."""
  return " ".join(quote(a) for a in cmd)


def run(cmd: Sequence[str]) -> int:
  """Echoes a command to stderr (as `set -x` would), runs it, returns its exit code."""
  print("+ " + join(cmd), file=sys.stderr, flush=True)
  return subprocess.call(list(cmd))
