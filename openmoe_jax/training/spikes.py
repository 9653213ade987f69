"""Loss-spike detection for automatic rollback (PaLM, Chowdhery et al. 2022, arXiv:2204.02311,
section 5.1: "restart training from a checkpoint roughly 100 steps before the spike started,
and skip roughly 200-500 data batches").

`SpikeDetector` keeps exponentially weighted running statistics (mean and variance) of each
step's loss and grad_norm and calls a step a spike when either is non-finite, or, after a
warm-up of `min_steps` finite steps, exceeds mean + threshold x std. The std is floored at
`min_relative_std` x |mean| so a run whose loss barely moves (tiny variance) does not call
noise a spike. Spiky values are not folded into the statistics. The state is a small JSON
dict, saved with each checkpoint's data position, so a rollback or a resume restores the
detector as it was at that checkpoint and meets the same steps with the same decisions.

The loop (`openmoe_jax/training/loop.py`) acts on a spike: it rolls back to an older checkpoint,
sets the newer ones aside and skips the batches the spike came from; decisions are appended to
MODEL_DIR/spikes.jsonl (`record`).
"""
import json
import math
from typing import Any, Dict, Mapping, Optional

from openmoe_jax import fs

SPIKES_FILE = "spikes.jsonl"
METRICS = ("loss", "grad_norm")


class SpikeDetector:
  """Running statistics of loss and grad_norm; `check(loss, grad_norm)` says whether a step is
  a spike (and why) and, when it is not, adds the step to the statistics.

  Statistics: the first `window` finite steps are averaged equally (weight 1/(n+1)), later ones
  with weight 1/window (an exponential moving mean and variance, West 1979), so the reference
  follows the slow fall of the loss but not a single step.
  """

  def __init__(self, threshold: float = 6.0, min_steps: int = 10, window: int = 100,
               min_relative_std: float = 0.05):
    self.threshold = float(threshold)
    self.min_steps = int(min_steps)
    self.window = int(window)
    self.min_relative_std = float(min_relative_std)
    self.count = 0
    self.mean = {k: 0.0 for k in METRICS}
    self.var = {k: 0.0 for k in METRICS}

  def limit(self, name: str) -> float:
    """The value of `name` above which a step is a spike (inf during warm-up)."""
    if self.count < self.min_steps:
      return math.inf
    std = max(math.sqrt(self.var[name]), self.min_relative_std * abs(self.mean[name]))
    return self.mean[name] + self.threshold * std

  def check(self, loss: float, grad_norm: float) -> Optional[str]:
    """None for a normal step (then added to the statistics), else the reason it is a spike."""
    values = {"loss": float(loss), "grad_norm": float(grad_norm)}
    for name, v in values.items():
      if not math.isfinite(v):
        return f"{name} is {v}"
    for name, v in values.items():
      if v > self.limit(name):
        return (f"{name} {v:.4g} above the running mean {self.mean[name]:.4g} + "
                f"{self.threshold:g} std ({self.limit(name):.4g})")
    self._add(values)
    return None

  def _add(self, values: Mapping[str, float]) -> None:
    alpha = 1.0 / min(self.count + 1, self.window)
    for name, v in values.items():
      diff = v - self.mean[name]
      inc = alpha * diff
      self.mean[name] += inc
      self.var[name] = (1.0 - alpha) * (self.var[name] + diff * inc)
    self.count += 1

  def get_state(self) -> Dict[str, Any]:
    """JSON-serialisable state (the settings are the run's, not saved)."""
    return {"count": self.count, "mean": dict(self.mean), "var": dict(self.var)}

  def set_state(self, state: Optional[Mapping[str, Any]]) -> None:
    """Continues from `get_state()`; None (a checkpoint saved without the detector): fresh."""
    state = state or {"count": 0, "mean": {k: 0.0 for k in METRICS},
                      "var": {k: 0.0 for k in METRICS}}
    self.count = int(state["count"])
    self.mean = {k: float(state["mean"][k]) for k in METRICS}
    self.var = {k: float(state["var"][k]) for k in METRICS}


def record(model_dir: str, decision: Mapping[str, Any]) -> None:
  """Appends one decision as a JSON line to MODEL_DIR/spikes.jsonl."""
  path = fs.join(model_dir, SPIKES_FILE)
  fs.append_text(path, json.dumps(dict(decision), sort_keys=True) + "\n")


def read(model_dir: str) -> list:
  """The decisions recorded in MODEL_DIR/spikes.jsonl (oldest first)."""
  path = fs.join(model_dir, SPIKES_FILE)
  if not fs.exists(path):
    return []
  return [json.loads(l) for l in fs.read_text(path).splitlines() if l.strip()]
