"""What the training loop says on the terminal and hears from it: one-line messages above the
progress bar, and SIGTERM / Ctrl-C turned into "save and stop".
"""
import signal
import sys
from typing import Optional

import jax


class Interrupts:
  """SIGTERM and the first Ctrl-C (SIGINT) set a flag: the loop saves a checkpoint and stops
  cleanly. A second Ctrl-C raises KeyboardInterrupt at once (abort without saving)."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread
        pass

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handler(self, signum, _frame):
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def restore(self) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Say:
  """One line on stderr from process 0, above the progress bar when there is one."""

  def __init__(self, bar):
    self._bar = bar

  def __call__(self, message: str) -> None:
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(f"openmoe-train: {message}", file=sys.stderr)
    else:
      print(f"openmoe-train: {message}", file=sys.stderr, flush=True)


def progress_bar(enabled: bool, start: int, total: int):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
