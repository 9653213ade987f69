"""Training metrics: MODEL_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

MODEL_DIR may be a local path or a URL (`gs://bucket/run`, see `openmoe_jax.fs`). Locally each
row is appended to metrics.jsonl as it is written. Object stores cannot append, so for a URL the
writer keeps all rows in memory (starting from the file's rows when a run resumes) and rewrites
the whole file, through a temporary name, at most every `flush_secs`, on `flush()` (the training
loop calls it after each checkpoint) and on `close()`. TensorBoard events go through
tensorboardX, whose event files reach URLs through tf.io.gfile.
"""
import json
import os
import sys
import time
from typing import Dict

import numpy as np

from openmoe_jax import fs

METRICS_FILE = "metrics.jsonl"


class _GFileRecordWriterFactory:
  """tensorboardX event files through tf.io.gfile (its own `gs://` writer needs the
  google-cloud-storage package; other URL schemes would become local folders)."""

  def open(self, path):
    return fs.gfile().GFile(path, "wb")

  def directory_check(self, path):
    fs.makedirs(path)


def _tensorboard_writer(logdir: str):
  # tensorboardX imports PyTorch, when installed, only to recognise torch tensors, which we never
  # log: one to two seconds of every training start. Hide it for that import (when the process
  # has not imported it already); tensorboardX then treats numpy arrays as its tensors.
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer
  except ImportError:  # pragma: no cover - tensorboardX is a dependency
    return None
  finally:
    if hide_torch:
      del sys.modules["torch"]
  if fs.is_url(logdir):
    record_writer.register_writer_factory(logdir.split(":")[0], _GFileRecordWriterFactory())
  return SummaryWriter(logdir)


class MetricsWriter:
  """Appends scalar (and per-layer vector) metrics; only process 0 writes."""

  def __init__(self, model_dir: str, enabled: bool = True, subdir: str = "train",
               flush_secs: float = 60.0):
    """Opens MODEL_DIR/metrics.jsonl and MODEL_DIR/tensorboard/SUBDIR.

    Args:
      model_dir: run directory, a local path or a URL.
      enabled: False on processes other than 0: every call does nothing.
      subdir: TensorBoard run name under MODEL_DIR/tensorboard.
      flush_secs: URL model dirs only: rewrite metrics.jsonl at most this often from `write`.
    """
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    fs.makedirs(model_dir)
    self._path = fs.join(model_dir, METRICS_FILE)
    self._rows = None  # URL model dirs: the file's whole content, one string per row
    if not fs.is_url(model_dir) and os.path.exists(self._path):
      # A run killed in the middle of a row leaves it unterminated: end it, so the rows of the
      # resumed run start on their own lines (readers skip the broken one).
      with open(self._path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
          f.seek(size - 1)
          if f.read(1) != b"\n":
            f.write(b"\n")
    if fs.is_url(model_dir):
      text = fs.read_text(self._path) if fs.exists(self._path) else ""
      self._rows = [line + "\n" for line in text.splitlines() if line]
      self._flush_secs = flush_secs
      self._flushed_at = time.monotonic()
      self._dirty = False
    self._tb = _tensorboard_writer(fs.join(model_dir, "tensorboard", subdir))

  def write(self, step: int, metrics: Dict[str, object]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      a = np.asarray(v)
      row[k] = a.item() if a.ndim == 0 else a.tolist()
      if self._tb is not None:
        if a.ndim == 0:
          self._tb.add_scalar(k, float(a), step)
        else:
          for i, x in enumerate(a.reshape(-1)):
            self._tb.add_scalar(f"{k}/{i}", float(x), step)
    line = json.dumps(row) + "\n"
    if self._rows is None:
      fs.append_text(self._path, line)
      return
    self._rows.append(line)
    self._dirty = True
    if time.monotonic() - self._flushed_at >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    """Makes every row written so far visible in metrics.jsonl (and TensorBoard)."""
    if not self.enabled:
      return
    if self._rows is not None and self._dirty:
      fs.write_text(self._path, "".join(self._rows))
      self._dirty = False
      self._flushed_at = time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if not self.enabled:
      return
    try:
      self.flush()
    finally:
      if self._tb is not None:
        self._close_tensorboard()

  def _close_tensorboard(self):
    try:
      self._tb.close()
    except OSError:
      # The event file cannot be completed (a full disk): give it up, or tensorboardX's atexit
      # hook retries the close and prints a traceback after the command's last line.
      for file_writer in (getattr(self._tb, "all_writers", None) or {}).values():
        events = getattr(file_writer, "event_writer", None)
        if hasattr(events, "_closed"):
          events._closed = True  # pylint: disable=protected-access
      raise
