"""The gin-configured training loop (t5x `train` conventions): train, evaluate, checkpoint, resume.

Phases: mesh -> data -> state (restore the latest complete checkpoint or init) -> jit -> loop ->
final checkpoint. Resume order: MODEL_DIR's latest complete checkpoint, else the parameters of
`initial_checkpoint_dir` (fine-tuning), else a fresh init.
"""
import math
import sys
import time
from typing import Any, Dict, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.training import console
from openmoe_jax.model import counts
from openmoe_jax.data import pipeline as data_lib  # seqio / TF load on first use, not on import
from openmoe_jax.evaluation import heldout as eval_loop
from openmoe_jax import fs
from openmoe_jax.training import state_layout as layout
from openmoe_jax.model import partitioning as part
from openmoe_jax.training import resume
from openmoe_jax.training import rollback
from openmoe_jax.training import run_dir
from openmoe_jax.training import run_setup
from openmoe_jax.training import settings
from openmoe_jax.training import spikes
from openmoe_jax.training import steps
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.errors import TrainingError, UsageError, error_line  # noqa: F401  TrainingError re-exported
from openmoe_jax.training.metrics_writer import METRICS_FILE, MetricsWriter
from openmoe_jax.evaluation.unigram import add_counts


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an n^3 float32 matmul on this process's devices: the MFU reference when no peak
  is configured (best of `repeats`, times the local device count)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best * jax.local_device_count()


def train(model_config: ModelConfig, *, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED, task_feature_lengths=gin.REQUIRED,
          train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          checkpoint_period: int = 1000, eval_period: int = 1000, eval_steps: int = 10,
          eval_split: str = "validation", log_period: int = 10, keep_checkpoints: int = 3,
          num_microbatches: int = 1, seed: int = 0, num_expert_partitions: int = 1,
          num_model_partitions: int = 1, optimizer: str = "adafactor",
          optimizer_kwargs: Optional[dict] = None, peak_flops_per_device: Optional[float] = None,
          pack: bool = True, progress_bar: bool = True, fail_on_nan: bool = True,
          num_data_shards: Optional[int] = None, num_expert_replicas: Optional[int] = None,
          initial_checkpoint_dir: Optional[str] = None,
          partitioning_rules: Optional[Sequence] = None, spike_rollbacks: int = 0,
          spike_threshold: float = 6.0, spike_skip_batches: int = 0,
          spike_min_steps: int = 10, spike_window: int = 100,
          spike_rollback_steps: int = 1) -> Dict[str, Any]:
  """Trains `model_config` on a seqio task or mixture; returns a summary of the run.

  Args mirror t5x's pretrain.gin macros: MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
  TRAIN_STEPS (the absolute final step), BATCH_SIZE (global, in sequences), CHECKPOINT_PERIOD,
  EVAL_PERIOD; NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS shape the mesh.
  num_data_shards: seqio shards of the training data (default: what the run recorded at its
    start, else one per process), so a resumed run sees the batches it would have seen.
  num_expert_replicas: the routing-group constraint (groups are a multiple of experts x
    replicas; default: the data axis, as flaxformer). A resume whose mesh would change it
    stops and asks for an explicit value.
  fail_on_nan: stop at the first non-finite loss or state (True), or train on, skipping the
    saves of non-finite states (False). A non-finite state is never saved either way.
  initial_checkpoint_dir: when MODEL_DIR has no checkpoint, start from the latest parameters
    of this MODEL_DIR (fine-tuning: the optimizer state is fresh; the step count continues and
    the learning-rate schedule follows it, as in t5x).
  partitioning_rules: logical axis -> mesh axes (default `partitioning.LOGICAL_AXIS_RULES`;
    openmoe-train passes the gin-bound `openmoe_jax.partitioning.axis_rules`).
  spike_rollbacks: how many loss-spike rollbacks the run may make (PaLM section 5.1; see
    `spikes.py` and docs/checkpoints.md "Loss spikes"). 0 (default): no detector, today's
    behaviour. Otherwise a step whose loss or grad_norm is non-finite or above the running mean
    + spike_threshold x std (after spike_min_steps steps; statistics over about spike_window
    steps) is undone: the run restores the newest checkpoint at least spike_rollback_steps
    steps before it (PaLM: about 100), sets the newer ones aside, skips the batches from that
    checkpoint's data position up to the spike's batch plus spike_skip_batches more, and
    records the decision in MODEL_DIR/spikes.jsonl. A spike after the last allowed rollback
    stops the run (TrainingError).

  Returns:
    {"step", "seconds", "steps_run", "model_dir", "checkpoint", "metrics_file", "train",
    "eval", "unigram_cross_entropy", "stopped_by"}: what `openmoe-train` prints at the end.
  """
  # --- checks: configuration errors are one line (exit code 2) before anything is written ---
  settings.check(locals())
  if not (isinstance(spike_threshold, (int, float)) and not isinstance(spike_threshold, bool)
          and spike_threshold > 0):
    raise UsageError(f"train.spike_threshold={spike_threshold!r}: must be a positive number")
  t_start = time.perf_counter()
  try:
    fs.check_writable_dir(model_dir)
  except ValueError as e:
    raise UsageError(f"MODEL_DIR: {e}") from None
  try:
    data_lib.get_provider(mixture_or_task_name)
  except ValueError as e:
    raise UsageError(error_line(e)) from None
  length = sum(task_feature_lengths.values())
  run = run_setup.build(
      model_config, batch_size=batch_size, seq_len=length,
      num_expert_partitions=num_expert_partitions, num_model_partitions=num_model_partitions,
      num_microbatches=num_microbatches, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
      num_expert_replicas=num_expert_replicas, rules=partitioning_rules)
  cfg, mesh = run.cfg, run.mesh
  resume_note = None
  if ckpt_lib.list_steps(model_dir):
    recorded_shards, resume_note = run_dir.check_resume_layout(
        model_dir, num_expert_replicas=cfg.num_expert_replicas,
        explicit_replicas=bool(num_expert_replicas), mesh_shape=dict(mesh.shape),
        process_count=jax.process_count())
    num_data_shards = num_data_shards or recorded_shards
  run_dir.check_model_dir(model_dir, cfg)
  data_lib.check_sources(mixture_or_task_name, "train")  # missing data or tokenizer: UsageError
  try:
    data_lib.check_features(mixture_or_task_name, task_feature_lengths, cfg.vocab_size)
  except ValueError as e:
    raise UsageError(error_line(e)) from None
  state_sh, abstract = run.state_layout(seed)
  # SIGTERM / Ctrl-C from here on stop the start-up cleanly (lock released, nothing trained).
  interrupts = console.Interrupts()
  lock = None
  try:
    # --- lock: from here on this process owns MODEL_DIR (a second trainer is refused). A
    # single-process run on a MODEL_DIR with checkpoints is locked before its data pipeline is
    # built, so a second trainer is refused at once; a new MODEL_DIR is created only once the
    # data checks have passed. Multi-process runs lock after the pipeline, as before (taking
    # the lock first there stalled a resume of tests/test_multiprocess.py: not yet understood).
    if jax.process_count() == 1 and ckpt_lib.list_steps(model_dir):
      lock = resume.acquire_lock(model_dir, console.Say(None))
    # --- data ---
    train_iter = data_lib.ShardedIterator(
        num_data_shards, mixture_or_task_name=mixture_or_task_name,
        task_feature_lengths=task_feature_lengths, split="train", batch_size=batch_size,
        shuffle=True, seed=seed, pack=pack)
    train_iter.check_first_batch(mixture_or_task_name, task_feature_lengths)
    if lock is None:
      lock = resume.acquire_lock(model_dir, console.Say(None))
    if interrupts.requested:
      return _stopped_at_start(interrupts, model_dir, train_steps, t_start)
    # --- state: the newest checkpoint that reads, else an initial checkpoint, else init ---
    ckpt, state, data_note, spike_state = _restore_or_init(
        run, model_dir, keep_checkpoints, initial_checkpoint_dir, state_sh, abstract,
        train_iter, seed)
    step = int(jax.device_get(state["step"]))
    if interrupts.requested:
      if ckpt is not None:
        ckpt.close()
      return _stopped_at_start(interrupts, model_dir, train_steps, t_start, step)
    # A run started from an initial checkpoint counts its updates from 0 (fresh optimizer
    # state) while its step continues: the learning rate follows the step, as in t5x.
    tx = run.with_step_offset(step - resume.update_count(state["opt_state"], default=step))
    # --- jit ---
    batch_sh = run.batch_sharding()
    step_fn = layout.jit_train_step(cfg, tx, run.schedule, state_sh, batch_sh,
                                    num_microbatches=num_microbatches, seed=seed)
    eval_fn = jax.jit(lambda p, b: steps.eval_step(p, b, cfg=cfg),
                      in_shardings=(state_sh["params"], batch_sh))
    # --- files: only now, when every check has passed ---
    ckpt = ckpt or ckpt_lib.Checkpointer(model_dir, max_to_keep=keep_checkpoints)
    if jax.process_index() == 0:
      # config.gin records the start of this MODEL_DIR: step 0, or a fine-tuning run's first step.
      run_dir.write_run_files(
          model_dir, mixture_or_task_name, task_feature_lengths,
          operative_config=gin.operative_config_str(), model_config=model_config,
          start_step=step, command=" ".join(sys.argv),
          layout={"batch_size": batch_size, "num_expert_replicas": cfg.num_expert_replicas,
                  "num_data_shards": num_data_shards or jax.process_count(),
                  "process_count": jax.process_count(), "mesh": dict(mesh.shape)})
      for note in (resume_note, data_note):
        if note:
          console.Say(None)(note)
    # --- loop ---
    def eval_iter():
      # The held-out set does not depend on train.seed (a mixture's sampling would): runs of
      # different seeds or designs are compared on the same examples, the ones openmoe-eval reads.
      return data_lib.ShardedIterator(
          num_data_shards, mixture_or_task_name=mixture_or_task_name,
          task_feature_lengths=task_feature_lengths, split=eval_split, batch_size=batch_size,
          shuffle=False, seed=data_lib.EVAL_SEED, pack=pack, num_epochs=1)

    guard = None
    if spike_rollbacks:
      guard = rollback.SpikeGuard(
          spikes.SpikeDetector(spike_threshold, min_steps=spike_min_steps, window=spike_window),
          model_dir, allowed=spike_rollbacks, skip_batches=spike_skip_batches,
          rollback_steps=spike_rollback_steps,
          abstract=abstract, keep_checkpoints=keep_checkpoints, saved=spike_state)
    result = _loop(run, state, step, train_steps, step_fn, eval_fn, batch_sh, train_iter,
                   eval_iter, ckpt, model_dir, checkpoint_period=checkpoint_period,
                   eval_period=eval_period, eval_steps=eval_steps, log_period=log_period,
                   peak_flops_per_device=peak_flops_per_device, progress_bar=progress_bar,
                   fail_on_nan=fail_on_nan, interrupts=interrupts, guard=guard)
  finally:
    interrupts.restore()
    if lock is not None:
      lock.release()
  result["seconds"] = time.perf_counter() - t_start
  return result


def _stopped_at_start(interrupts, model_dir, train_steps, t_start, step=None) -> Dict[str, Any]:
  """The summary of a start stopped by a signal before its first step: nothing trained or
  written; the lock is released by the caller."""
  console.Say(None)(f"{interrupts.signal_name} received during start-up: stopped before "
                    "training a step, nothing saved; run the same command to start again")
  latest = ckpt_lib.list_steps(model_dir) if fs.exists(model_dir) else []
  return {"step": step if step is not None else (latest[-1] if latest else 0), "steps_run": 0,
          "train_steps": train_steps, "seconds": time.perf_counter() - t_start,
          "model_dir": model_dir,
          "checkpoint": str(ckpt_lib.checkpoint_dir(model_dir) / str(latest[-1])) if latest
          else None,
          "metrics_file": fs.join(model_dir, METRICS_FILE), "train": {}, "eval": {},
          "stopped_by": interrupts.signal_name}


def _restore_or_init(run, model_dir, keep_checkpoints, initial_checkpoint_dir, state_sh,
                     abstract, train_iter, seed):
  """(checkpointer or None, state, note on the data position or None, the spike detector's saved
  state or None): the newest checkpoint of MODEL_DIR that reads, else the parameters of
  `initial_checkpoint_dir`, else a fresh init."""
  resume.set_aside_incomplete(model_dir, console.Say(None))
  restored = resume.restore_newest(model_dir, abstract, keep_checkpoints, console.Say(None))
  if restored is not None:
    ckpt, state, data_state, restored_step = restored
    positions = ckpt_lib.read_positions(model_dir, restored_step, train_iter.shard_indices)
    # Another pipeline's position: UsageError. A saved tf.data position restores in constant
    # time; without one the stream is replayed (said, with the reason).
    return (ckpt, state, train_iter.set_state(data_state, positions),
            data_state.get(rollback.STATE_KEY))
  if initial_checkpoint_dir:
    return None, resume.init_from(initial_checkpoint_dir, run.tx, abstract, state_sh,
                                  run.mesh), None, None
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    state = jax.jit(lambda r: part.unbox(run.init_fn(r)), out_shardings=state_sh)(
        jax.random.key(seed))
  return None, state, None, None


def _loop(run, state, step, train_steps, step_fn, eval_fn, batch_sh, train_iter, eval_iter, ckpt,
          model_dir, *, checkpoint_period, eval_period, eval_steps, log_period,
          peak_flops_per_device, progress_bar, fail_on_nan, interrupts,
          guard=None) -> Dict[str, Any]:
  """Steps from `step` to TRAIN_STEPS (or a stop signal): logs, saves finite states, evaluates.

  With a `rollback.SpikeGuard`, every step's loss and grad_norm go to its detector one step late (at a
  save step at once, so a spiky state is never saved); a spike rolls the run back.
  """
  cfg, length, batch_size = run.cfg, run.seq_len, run.batch_size
  first_step = step
  writer = MetricsWriter(model_dir, enabled=jax.process_index() == 0)
  flops_per_token = counts.summarize(cfg, seq_len=length)["train_flops_per_token"]
  peak = (peak_flops_per_device * jax.device_count() if peak_flops_per_device
          else matmul_peak_flops() * jax.process_count())
  last: Dict[str, float] = {}
  last_eval: Dict[str, float] = {}
  unigram_counts = np.zeros(cfg.vocab_size, np.float64)
  end = train_steps
  bar = console.progress_bar(progress_bar, step, train_steps)
  say = console.Say(bar)
  if step >= end:
    say(f"MODEL_DIR is at step {step}, not before TRAIN_STEPS={end}: nothing to train "
        f"(raise TRAIN_STEPS to continue)")
  pending, t_last, logged_at = None, None, step
  saved_at = ckpt.latest_step()
  watch = None  # (step, metrics) of the last step the spike guard has not seen yet
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      while step < end:
        host_batch = next(train_iter)
        add_counts(unigram_counts, host_batch)
        state, metrics = step_fn(state, data_lib.to_global_arrays(host_batch, batch_sh))
        step += 1
        # The spike guard sees the previous step now (the host does not wait on the device).
        if guard is not None and watch is not None:
          seen, watch = watch, None
          rolled = guard.check(*seen, step_now=step, state=state, ckpt=ckpt,
                               train_iter=train_iter, say=say)
          if rolled is not None:
            state, step, ckpt, pending = rollback.after_rollback(rolled, pending)
            saved_at, t_last, logged_at = ckpt.latest_step(), time.perf_counter(), step
            continue
        # Fetch the previous logged step's metrics only now, so the host does not wait on the
        # device to write them.
        if pending is not None:
          last = _log(writer, bar, *pending, fail_on_nan=fail_on_nan, ckpt=ckpt)
          pending = None
        # perf/ times the device: the window runs from one finished step to another (the
        # host waits for the device at a logged step and after this start's first step, so
        # neither the compile nor a host running ahead of the device enters it).
        if step == first_step + 1:
          jax.block_until_ready(metrics["loss"])
          t_last, logged_at = time.perf_counter(), step
        if step % log_period == 0 or step == end:
          jax.block_until_ready(metrics["loss"])
          now = time.perf_counter()
          window = step - logged_at
          pending = (step, metrics, (now - t_last) / window if window else None,
                     length * batch_size, flops_per_token, peak)
          t_last, logged_at = now, step
        stop = interrupts.stop_at(step)
        save = step % checkpoint_period == 0 or step == end or stop
        if guard is not None:
          if save:  # this step's state may be saved only once the guard has seen it
            rolled = guard.check(step, metrics, step_now=step, state=state, ckpt=ckpt,
                                 train_iter=train_iter, say=say)
            if rolled is not None:
              state, step, ckpt, pending = rollback.after_rollback(rolled, pending)
              saved_at, t_last, logged_at = ckpt.latest_step(), time.perf_counter(), step
              continue
          else:
            watch = (step, metrics)
        if save:
          if _finite_or_stop(step, metrics, ckpt, fail_on_nan, say):
            data_state, positions = train_iter.checkpoint_items()
            if guard is not None:
              data_state = {**data_state, rollback.STATE_KEY: guard.get_state()}
            ckpt.save(step, state, data_state, force=True, data_positions=positions)
            saved_at = step
          writer.flush()  # URL model dirs rewrite metrics.jsonl at most every minute otherwise
        if eval_period and step % eval_period == 0:
          last_eval = eval_loop.evaluate_and_report(
              state["params"], eval_fn, batch_sh, step, writer, say, unigram_counts,
              eval_iter(), eval_steps)
          last.update(last_eval)
        if stop:
          break
      if pending is not None:
        last = _log(writer, bar, *pending, fail_on_nan=fail_on_nan, ckpt=ckpt)
    ckpt.wait_until_finished()
  finally:
    try:
      ckpt.close()
    finally:
      try:
        writer.close()  # also when the checkpoint could not close (a full disk)
      finally:
        if bar is not None:
          bar.close()
  if interrupts.requested:
    say(f"{interrupts.signal_name} received: saved checkpoint {saved_at} in "
        f"{ckpt_lib.checkpoint_dir(model_dir)}; run the same command to resume")
  return {"step": step, "steps_run": step - first_step, "train_steps": train_steps,
          "model_dir": model_dir,
          "checkpoint": None if saved_at is None else str(
              ckpt_lib.checkpoint_dir(model_dir) / str(saved_at)),
          "metrics_file": fs.join(model_dir, METRICS_FILE), "train": last, "eval": last_eval,
          "stopped_by": interrupts.signal_name}


# A finite checkpoint can already hold the start of a divergence (the weights grow for a few
# steps before the loss is NaN): resuming from it with the same settings meets the same NaN.
_ADVICE = (", though it may already be on the way to this divergence: lower the learning rate "
           "(OPTIMIZER_KWARGS) and run the same command to resume, or let the run roll back "
           "further by itself (train.spike_rollbacks=1 train.spike_rollback_steps=N, "
           "docs/checkpoints.md)")


def _finite_or_stop(step, metrics, ckpt, fail_on_nan: bool, say) -> bool:
  """True when step `step`'s loss and updated state are finite, i.e. the state may be saved.

  Otherwise stops (TrainingError) or, with fail_on_nan=False, says that the save is skipped.
  """
  m = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", steps.STATE_FINITE)})
  loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
  if math.isfinite(loss) and m[steps.STATE_FINITE] > 0:
    return True
  what = (f"loss is {loss} at step {step}" if not math.isfinite(loss) else
          f"the update of step {step} made the parameters or optimizer state non-finite "
          f"(loss {loss:.4g}, grad_norm {grad_norm:.4g})")
  ckpt.wait_until_finished()
  latest = ckpt.latest_step()
  kept = (f"the newest checkpoint, step {latest}, holds a finite state" if latest is not None
          else "no checkpoint has been written")
  if not fail_on_nan:
    say(f"{what}: checkpoint {step} not saved; {kept}")
    return False
  raise TrainingError(f"{what}; stopped without saving it; {kept}{_ADVICE}")


def _check_finite(step, metrics, ckpt):
  """Stops (TrainingError) at a logged step whose loss is not finite; nothing is saved."""
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    ckpt.wait_until_finished()
    latest = ckpt.latest_step()
    kept = (f"the newest checkpoint, step {latest}, holds a finite state" if latest is not None
            else "no checkpoint has been written")
    raise TrainingError(f"loss is {loss} at step {step}; stopped; {kept}{_ADVICE}")


def _log(writer, bar, step, metrics, sec_per_step, tokens_per_step, flops_per_token, peak, *,
         fail_on_nan, ckpt):
  if fail_on_nan:
    _check_finite(step, metrics, ckpt)
  metrics = jax.device_get(metrics)
  metrics.pop(steps.STATE_FINITE, None)
  loss = float(metrics["loss"])
  out = dict(metrics)
  if sec_per_step:  # None for this start's first step alone: its time is mostly the compile
    tps = tokens_per_step / sec_per_step
    out.update({"perf/tokens_per_second": tps, "perf/seconds_per_step": sec_per_step,
                "perf/mfu": tps * flops_per_token / peak})
  writer.write(step, out)
  if bar is not None:
    bar.n = step
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.refresh()
  return out
