"""The commands' shared terminal behaviour: native-library noise filtered, errors last."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r"""
import os, sys
from openmoe_jax.commands import cli
cli.filter_native_stderr()
w = lambda s: os.write(2, s.encode())
w("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
w("I0000 00:00:1796068805.680307   10468 port.cc:153] oneDNN custom operations are on.\n")
w("I0000 00:00:1796068805.681387   10468 cudart_stub.cc:31] Could not find cuda drivers\n")
w("E0000 00:00:1796068124.529344    3690 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
w("normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\n")
w("a real problem: keep me\n")
w(" 10%|#         | 1/10\r 20%|##        | 2/10")
print("\nopenmoe-x: error: the last line", file=sys.stderr)
"""


def test_known_noise_is_dropped_and_everything_else_kept_in_order():
  r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stderr == (b"a real problem: keep me\n 10%|#         | 1/10\r 20%|##        | 2/10\n"
                      b"openmoe-x: error: the last line\n"), r.stderr


def test_a_closed_reader_never_blocks_the_writer():
  script = SCRIPT.replace('print("\\nopenmoe-x', 'w("x" * 200000 + "\\n")\nprint("\\nopenmoe-x')
  p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=ROOT)
  p.stderr.close()  # like `| head` exiting early
  assert p.wait(timeout=120) == 0


def _raise_wrapped_no_space():
  import errno
  try:
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/4/state")
  except OSError as e:  # as orbax re-raises the error of its background save
    raise RuntimeError("async save failed") from e


def test_a_full_disk_is_one_line_and_exit_1_other_errors_keep_their_traceback(capsys):
  import errno
  import pytest
  from openmoe_jax.commands import cli
  assert cli.run("openmoe-x", _raise_wrapped_no_space) == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("openmoe-x: no space left on the device writing "
                         "/runs/x/checkpoints/4/state: what was completely written before"), last

  def other():
    raise OSError(errno.EACCES, "Permission denied")
  with pytest.raises(OSError):  # not a full disk: a bug's traceback stays
    cli.run("openmoe-x", other)


def test_a_commands_gin_lock_ends_with_the_command():
  """A command finalizes (locks) gin; the next command in the same process may still import
  modules that register configurables (tasks/, vocabularies): the lock ends with `cli.run`."""
  import gin
  from openmoe_jax.commands import cli
  from openmoe_jax import gin_utils

  def body():
    gin_utils.parse_gin(["models/tiny.gin"], [])
    assert gin.config_is_locked()
    return 0
  assert cli.run("openmoe-x", body) == 0
  assert not gin.config_is_locked()
