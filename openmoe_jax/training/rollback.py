"""Automatic recovery from loss spikes: the training loop's `SpikeGuard` acts on the decisions
of a `spikes.SpikeDetector` (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, section 5.1): it rolls
the run back to the newest checkpoint before a spike, sets the newer checkpoints aside (never
deletes them), skips the batches the spike came from and records the decision in
MODEL_DIR/spikes.jsonl, up to `train.spike_rollbacks` times; then the run stops as a
non-finite value stops it. docs/checkpoints.md "Loss spikes" describes the settings.
"""
import math
from typing import Any, Dict

import jax

from openmoe_jax.errors import TrainingError
from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.training import spikes
from openmoe_jax.training import steps


STATE_KEY = "spikes"  # the spike guard's state, beside the data position in a checkpoint


def after_rollback(rolled, pending):
  """(state, step, checkpointer, pending) after a rollback: the metrics waiting to be logged
  are dropped when they are of the spike's step or later (those steps are undone)."""
  state, step, ckpt, spike_step = rolled
  if pending is not None and pending[0] >= spike_step:
    pending = None
  return state, step, ckpt, pending


class SpikeGuard:
  """Acts on the decisions of a `spikes.SpikeDetector`: rolls back to the newest checkpoint
  before a spike, sets the newer ones aside, skips the spike's batches, records the decision.

  Its state (detector statistics, rollbacks made) is saved in each checkpoint's data item, so a
  rollback or a resume restores it as it was there: a rerun killed after a rollback restores
  the same checkpoint, meets the same spike and makes the same decision.
  """

  def __init__(self, detector, model_dir, *, allowed, skip_batches, rollback_steps, abstract,
               keep_checkpoints, saved=None):
    self.detector, self.model_dir, self.rollback_steps = detector, model_dir, rollback_steps
    self.allowed, self.skip_batches = allowed, skip_batches
    self.abstract, self.keep_checkpoints = abstract, keep_checkpoints
    saved = saved or {}
    self.detector.set_state(saved.get("detector"))
    self.used = int(saved.get("rollbacks", 0))

  def get_state(self) -> Dict[str, Any]:
    return {"detector": self.detector.get_state(), "rollbacks": self.used}

  def check(self, step, metrics, *, step_now, state, ckpt, train_iter, say):
    """None when step `step` is normal; else (state, step, checkpointer, spike step) after
    the rollback. `step_now` is the step the loop has reached (the state of the steps after
    `step` is discarded). TrainingError when no rollback is left or no checkpoint is older."""
    m = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", steps.STATE_FINITE)})
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    mean = self.detector.mean["loss"]
    if math.isfinite(loss) and math.isfinite(grad_norm) and m[steps.STATE_FINITE] <= 0:
      reason = "the update made the parameters or optimizer state non-finite"
    else:  # a non-finite loss or grad_norm is said as such; a spiky state is not added
      reason = self.detector.check(loss, grad_norm)
    if reason is None:
      return None
    what = (f"loss spike at step {step} (loss {loss:.4g}, grad_norm {grad_norm:.4g}; "
            f"running mean {mean:.4g})")
    ckpt.wait_until_finished()
    # Never a checkpoint of the spike's step or later (it holds the spike's update); with
    # spike_rollback_steps > 1 not the last steps before it either (their state may already be
    # on the way to the spike).
    older = [s for s in ckpt.all_steps() if s <= step - self.rollback_steps]
    if self.used >= self.allowed or not older:
      why = (f"all {self.allowed} rollbacks of train.spike_rollbacks are used"
             if self.used >= self.allowed else
             f"no checkpoint at least train.spike_rollback_steps={self.rollback_steps} steps "
             "before it to roll back to")
      latest = ckpt.latest_step()
      kept = (f"the newest checkpoint, step {latest}, holds a state from before the spike"
              if latest is not None else "no checkpoint has been written")
      raise TrainingError(f"{what}: {reason}; {why}; stopped without saving it; {kept}: lower "
                          "the learning rate (OPTIMIZER_KWARGS) or raise train.spike_rollbacks "
                          "and run again to resume")
    target = older[-1]
    # The batch position right after the spike's batch: one batch was read per step since.
    after_spike = (train_iter.get_state()["shards"][0]["batches_consumed"] - (step_now - step))
    ckpt.close()  # reopened once the newer steps are out of its listing
    newer = [s for s in ckpt_lib.list_steps(self.model_dir) if s > target]
    moved = []
    if jax.process_index() == 0:
      moved = [ckpt_lib.set_aside(self.model_dir, s, "spike") for s in newer]
    ckpt_lib.allgather_json(0)  # every process waits for the moves
    ckpt = ckpt_lib.Checkpointer(self.model_dir, max_to_keep=self.keep_checkpoints)
    state, data_state = ckpt.restore(target, self.abstract)
    positions = ckpt_lib.read_positions(self.model_dir, target, train_iter.shard_indices)
    train_iter.set_state(data_state, positions)
    # The detector as it was at the target; the rollbacks made keep counting (a rerun from the
    # target makes them again, in the same order, so it counts alike).
    self.detector.set_state((data_state.get(STATE_KEY) or {}).get("detector"))
    self.used += 1
    start = data_state["shards"][0]["batches_consumed"]
    stop = max(after_spike + self.skip_batches, start)
    for _ in range(stop - start):  # the skipped batches are read, not trained on
      next(train_iter)
    if jax.process_index() == 0:
      spikes.record(self.model_dir, {
          "step": step, "reason": reason, "loss": loss, "grad_norm": grad_norm,
          "running_mean_loss": mean, "rolled_back_to": target,
          "skipped_batches": [start, stop], "set_aside": moved, "rollback": self.used,
          "rollbacks_allowed": self.allowed})
    say(f"{what}: rolled back to checkpoint {target}, skipping batches {start}..{stop - 1}; "
        f"rollback {self.used} of {self.allowed}")
    return state, int(jax.device_get(state["step"])), ckpt, step
