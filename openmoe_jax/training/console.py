"""What the training loop says on the terminal and hears from it: one-line messages above the
progress bar, and SIGTERM / Ctrl-C turned into "save and stop".
"""
import signal
import sys
from typing import Optional

import jax


class Interrupts:
  """SIGTERM and the first Ctrl-C (SIGINT) ask the loop to save a checkpoint and stop cleanly;
  a second Ctrl-C raises KeyboardInterrupt at once (abort without saving).

  One process: a Python handler sets a flag. Several processes (jax.distributed): a signal may
  reach one process only (a preempted VM), yet all must save the same step. JAX's preemption
  service (on by default with jax.distributed) catches SIGTERM in every process and agrees on
  a step through the coordination service; `stop_at(step)`, called by every process at every
  step, is then True on all processes at the same step
  (`multihost_utils.reached_preemption_sync_point`). Ctrl-C is turned into SIGTERM for it.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._synced = jax.process_count() > 1
    self._old = {}
    handled = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
      try:
        self._old[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread
        pass

  @property
  def requested(self) -> bool:
    """A stop was agreed (set by `stop_at`) or, with one process, asked for."""
    return self.signal_name is not None

  def stop_at(self, step: int) -> bool:
    """True when the loop should save and stop after `step` (every process, every step)."""
    if self._synced and self.signal_name is None:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = "SIGTERM"
    return self.requested

  def _handler(self, signum, _frame):
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    if self._synced:  # JAX's preemption service listens for SIGTERM in every process
      signal.raise_signal(signal.SIGTERM)
    else:
      self.signal_name = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


_PROG = ["openmoe_jax"]


def set_prog(prog: str) -> None:
  """The command's name, for the notes library functions print (`cli.run` sets it)."""
  _PROG[0] = prog


def prog() -> str:
  return _PROG[0]


class Say:
  """One line on stderr from process 0, above the progress bar when there is one."""

  def __init__(self, bar, prog: str = "openmoe-train"):
    self._bar = bar
    self._prog = prog

  def __call__(self, message: str) -> None:
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(f"{self._prog}: {message}", file=sys.stderr)
    else:
      print(f"{self._prog}: {message}", file=sys.stderr, flush=True)


def progress_bar(enabled: bool, start: int, total: int):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
