"""Training metrics: MODEL_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard."""
import json
import os
from typing import Dict

import numpy as np


class MetricsWriter:
  """Appends scalar (and per-layer vector) metrics; only process 0 writes."""

  def __init__(self, model_dir: str, enabled: bool = True, subdir: str = "train"):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    self._path = os.path.join(model_dir, "metrics.jsonl")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard", subdir))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

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
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
