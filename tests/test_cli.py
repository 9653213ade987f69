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
