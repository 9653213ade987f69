"""The gin-configured training loop (t5x `train` conventions): train, evaluate, checkpoint, resume.

Phases: mesh -> data -> state (restore the latest complete checkpoint or init) -> jit -> loop ->
final checkpoint. Resume order: MODEL_DIR's latest complete checkpoint, else the parameters of
`initial_checkpoint_dir` (fine-tuning), else a fresh init.
"""
import dataclasses
import json
import math
import signal
import time
from typing import Dict, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import data as data_lib  # seqio / TF load on first use, not on import
from openmoe_jax import fs
from openmoe_jax import info as info_lib
from openmoe_jax import layout
from openmoe_jax import partitioning as part
from openmoe_jax import routing
from openmoe_jax import steps
from openmoe_jax.config import ModelConfig
from openmoe_jax.gin_utils import UsageError, error_line
from openmoe_jax.metrics_writer import MetricsWriter
from openmoe_jax.optimizer import make_optimizer


class TrainingError(Exception):
  """Training stopped (for example on a NaN loss); the last good checkpoint is kept."""


def _check_model_dir(model_dir: str, cfg: ModelConfig) -> None:
  """Refuses a MODEL_DIR that holds checkpoints of a different model (reads only)."""
  path = fs.join(model_dir, "model_config.json")
  ours = dataclasses.asdict(cfg)
  if fs.exists(path) and ckpt_lib.list_steps(model_dir):
    theirs = json.loads(fs.read_text(path))
    shape_keys = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "expert_mlp_dim",
                  "num_layers", "num_experts", "num_sparse_layers")
    diff = [k for k in shape_keys if theirs.get(k) != ours[k]]
    if diff:
      raise UsageError(f"MODEL_DIR {model_dir} holds a different model ("
                       + ", ".join(f"{k}: {theirs.get(k)} != {ours[k]}" for k in diff) + ")")


def write_run_files(model_dir: str, mixture_or_task_name: str, task_feature_lengths,
                    operative_config: Optional[str] = None,
                    model_config: Optional[ModelConfig] = None) -> None:
  """MODEL_DIR/run.json (read by openmoe-score / -eval) and, when given, config.gin and
  model_config.json (read by the tools and by the next start's `_check_model_dir`).

  Each is written to a temporary name and renamed; MODEL_DIR may be a URL.
  """
  fs.makedirs(model_dir)
  if model_config is not None:
    fs.write_text(fs.join(model_dir, "model_config.json"),
                  json.dumps(dataclasses.asdict(model_config), indent=1))
  if operative_config is not None:
    fs.write_text(fs.join(model_dir, "config.gin"), operative_config)
  fs.write_text(fs.join(model_dir, "run.json"), json.dumps(
      {"mixture_or_task_name": mixture_or_task_name,
       "task_feature_lengths": dict(task_feature_lengths)}))


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


class _ShardedIterator:
  """This process's share of `num_data_shards` seqio shards, rows concatenated in shard order.

  With one shard per process this is the plain per-host iterator. A single process reading
  all shards of a multi-host run sees the same global batches, which is how multi-host runs
  are checked against single-host ones.
  """

  def __init__(self, num_data_shards: Optional[int], **kwargs):
    n, p, i = num_data_shards or jax.process_count(), jax.process_count(), jax.process_index()
    if n % p:
      raise UsageError(f"num_data_shards={n} must be a multiple of the process count {p}")
    per = n // p
    batch = kwargs.pop("batch_size")
    self._its = [data_lib.make_iterator(batch_size=batch, shard_index=i * per + j, num_shards=n,
                                        **kwargs) for j in range(per)]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

  def get_state(self):
    """The position of every shard of every process, `{"shards": [...]}` in shard order.

    Collective in multi-process runs (every process calls it), because the checkpoint's data
    item is written by process 0 alone.
    """
    mine = [it.get_state() for it in self._its]
    shards = [s for part in ckpt_lib.allgather_json(mine) for s in part]
    return {"shards": sorted(shards, key=lambda s: s["shard_index"])}

  def set_state(self, state):
    """Continues each of this process's shards from the saved shard with its index."""
    saved = {s.get("shard_index"): s for s in state["shards"]}
    for it in self._its:
      # No saved shard with this index: the shard count changed, which set_state reports.
      it.set_state(saved.get(it.shard_index, state["shards"][0]))


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      pass

  def _handler(self, *_):
    self.requested = True


def evaluate(params, eval_fn, iterator, batch_sharding, num_batches: int) -> Dict[str, float]:
  """Loss, perplexity and token accuracy over `num_batches` validation batches."""
  totals: Dict[str, float] = {}
  for _, batch in zip(range(num_batches), iterator):
    out = jax.device_get(eval_fn(params, data_lib.to_global_arrays(batch, batch_sharding)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.get("weight", 0.0), 1.0)
  loss = totals.get("ce_sum", 0.0) / n
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
          "eval/token_accuracy": totals.get("correct", 0.0) / n}


@gin.configurable(denylist=["model_config"])
def train(model_config: ModelConfig, *, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED, task_feature_lengths=gin.REQUIRED,
          train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          checkpoint_period: int = 1000, eval_period: int = 1000, eval_steps: int = 10,
          eval_split: str = "validation", log_period: int = 10, keep_checkpoints: int = 3,
          num_microbatches: int = 1, seed: int = 0, num_expert_partitions: int = 1,
          num_model_partitions: int = 1, optimizer: str = "adafactor",
          optimizer_kwargs: Optional[dict] = None, peak_flops_per_device: Optional[float] = None,
          pack: bool = True, progress_bar: bool = True, fail_on_nan: bool = True,
          num_data_shards: Optional[int] = None,
          initial_checkpoint_dir: Optional[str] = None) -> Dict[str, float]:
  """Trains `model_config` on a seqio task or mixture; returns the last logged metrics.

  Args mirror t5x's pretrain.gin macros: MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
  TRAIN_STEPS (the absolute final step), BATCH_SIZE (global, in sequences), CHECKPOINT_PERIOD,
  EVAL_PERIOD; NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS shape the mesh.
  num_data_shards: seqio shards of the training data (default: one per process).
  initial_checkpoint_dir: when MODEL_DIR has no checkpoint, start from the latest parameters
  of this MODEL_DIR (fine-tuning: the optimizer state is fresh; the step count continues and
  the learning-rate schedule follows it, as in t5x).
  """
  cfg = model_config
  # --- checks: configuration errors are one line (exit code 2) before anything is written ---
  try:
    data_lib.get_provider(mixture_or_task_name)
    mesh = part.make_mesh(num_expert_partitions, num_model_partitions)
    part.check_experts_divisible(cfg.num_experts, mesh)
  except ValueError as e:
    raise UsageError(error_line(e)) from None
  # flaxformer: groups are a multiple of experts x replicas, so they split over (data, expert).
  cfg = cfg.replace(num_expert_replicas=mesh.shape["data"])
  if batch_size % (mesh.shape["data"] * mesh.shape["expert"] * num_microbatches):
    raise UsageError(f"BATCH_SIZE={batch_size} must be divisible by data*expert partitions "
                     f"({mesh.shape['data'] * mesh.shape['expert']}) x num_microbatches "
                     f"({num_microbatches})")
  length = sum(task_feature_lengths.values())
  _check_routing_groups(cfg, batch_size, num_microbatches, length)
  optimizer_kwargs = dict(optimizer_kwargs or {})
  tx, schedule = _make_optimizer(optimizer, optimizer_kwargs)
  _check_model_dir(model_dir, cfg)
  data_lib.check_sources(mixture_or_task_name, "train")  # missing data or tokenizer: UsageError
  init_fn = lambda rng: steps.init_state(cfg, tx, rng, batch_size // num_microbatches, length)
  state_sh, abstract = layout.state_layout(init_fn, mesh, jax.random.key(seed))
  _check_divisible(abstract["params"], mesh)
  param_sh = state_sh["params"]
  # --- data ---
  train_iter = _ShardedIterator(
      num_data_shards, mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=task_feature_lengths, split="train", batch_size=batch_size,
      shuffle=True, seed=seed, pack=pack)
  # --- state ---
  start = (ckpt_lib.list_steps(model_dir) or [None])[-1]
  ckpt = None
  if start is not None:
    ckpt = ckpt_lib.Checkpointer(model_dir, max_to_keep=keep_checkpoints)
    state, data_state = ckpt.restore(start, abstract)
    train_iter.set_state(data_state)  # another pipeline's position: UsageError
  elif initial_checkpoint_dir:
    state = _init_from(initial_checkpoint_dir, tx, abstract, state_sh, mesh)
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(part.axis_rules()):
      state = jax.jit(lambda r: part.unbox(init_fn(r)), out_shardings=state_sh)(
          jax.random.key(seed))
  step = int(jax.device_get(state["step"]))
  # A run started from an initial checkpoint counts its updates from 0 (fresh optimizer state)
  # while its step continues: the learning rate follows the step, as in t5x.
  step_offset = step - _update_count(state["opt_state"], default=step)
  if step_offset:
    tx, _ = _make_optimizer(optimizer, optimizer_kwargs, step_offset=step_offset)
  # --- jit ---
  batch_sh = part.batch_sharding(mesh)
  step_fn = jax.jit(
      lambda s, b: steps.train_step(s, b, cfg=cfg, tx=tx, schedule=schedule,
                                    num_microbatches=num_microbatches, seed=seed),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
  eval_fn = jax.jit(lambda p, b: steps.eval_step(p, b, cfg=cfg),
                    in_shardings=(param_sh, batch_sh))
  # --- files: only now, when every check has passed ---
  ckpt = ckpt or ckpt_lib.Checkpointer(model_dir, max_to_keep=keep_checkpoints)
  if jax.process_index() == 0:
    # config.gin records the start of this MODEL_DIR: step 0, or a fine-tuning run's first step.
    write_run_files(model_dir, mixture_or_task_name, task_feature_lengths,
                    operative_config=gin.operative_config_str() if start is None else None,
                    model_config=model_config)
  writer = MetricsWriter(model_dir, enabled=jax.process_index() == 0)
  flops_per_token = info_lib.summarize(cfg, seq_len=length)["train_flops_per_token"]
  peak = (peak_flops_per_device * jax.device_count() if peak_flops_per_device
          else matmul_peak_flops() * jax.process_count())
  # --- loop ---
  preempt = _Preemption()
  last: Dict[str, float] = {}
  end = train_steps
  bar = _progress(progress_bar, step, train_steps)
  pending, t_last, logged_at = None, time.perf_counter(), step
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.axis_rules()):
    while step < end:
      batch = data_lib.to_global_arrays(next(train_iter), batch_sh)
      state, metrics = step_fn(state, batch)
      step += 1
      # Fetch the previous logged step's metrics only now, so the host never waits on the device.
      if pending is not None:
        last = _log(writer, bar, *pending, fail_on_nan=fail_on_nan, ckpt=ckpt)
        pending = None
      if step % log_period == 0 or step == end:
        now = time.perf_counter()
        pending = (step, metrics, (now - t_last) / max(step - logged_at, 1), length * batch_size,
                   flops_per_token, peak)
        t_last, logged_at = now, step
      if step % checkpoint_period == 0 or step == end or preempt.requested:
        if fail_on_nan:
          _check_finite(step, metrics, ckpt)
        ckpt.save(step, state, train_iter.get_state(), force=True)
        writer.flush()  # URL model dirs rewrite metrics.jsonl at most every minute otherwise
      if eval_period and step % eval_period == 0:
        ev = evaluate(state["params"], eval_fn, _ShardedIterator(
            num_data_shards, mixture_or_task_name=mixture_or_task_name,
            task_feature_lengths=task_feature_lengths, split=eval_split, batch_size=batch_size,
            shuffle=False, seed=seed, pack=pack, num_epochs=1), batch_sh, eval_steps)
        writer.write(step, ev)
        last.update(ev)
      if preempt.requested:
        break
    if pending is not None:
      last = _log(writer, bar, *pending, fail_on_nan=fail_on_nan, ckpt=ckpt)
  ckpt.wait_until_finished()
  ckpt.close()
  writer.close()
  if bar is not None:
    bar.close()
  return last


def _init_from(source_dir: str, tx, abstract, state_sh, mesh):
  """Fresh optimizer state around the parameters of another run's latest checkpoint."""
  steps_there = ckpt_lib.list_steps(source_dir)
  if not steps_there:
    raise UsageError(f"initial checkpoint: no complete checkpoint in {source_dir}")
  loaded = ckpt_lib.restore_params(source_dir, steps_there[-1])
  want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract["params"])
  got = jax.tree.map(lambda a: (a.shape, a.dtype), loaded)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise UsageError(f"initial checkpoint in {source_dir} does not match the model gin")
  params = jax.tree.map(lambda a, s: jax.device_put(a, s), loaded, state_sh["params"])
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
  step = jax.device_put(jnp.int32(steps_there[-1]), state_sh["step"])
  return {"step": step, "params": params, "opt_state": opt_state}


def _check_routing_groups(cfg: ModelConfig, batch_size: int, num_microbatches: int,
                          length: int) -> None:
  """Fails early (UsageError) when a microbatch or an eval batch cannot form routing groups."""
  if not cfg.num_experts or not cfg.moe_layers:
    return
  for rows, what in ((batch_size // num_microbatches, "BATCH_SIZE / NUM_MICROBATCHES"),
                     (batch_size, "BATCH_SIZE (evaluation)")):
    try:
      routing.num_groups(rows * length, cfg.group_size, cfg.num_experts, cfg.num_expert_replicas)
    except ValueError as e:  # num_groups validates its arguments only
      raise UsageError(f"{e} ({what} = {rows} rows x {length} tokens)") from None


def _check_divisible(params, mesh) -> None:
  """Fails early (UsageError) when a parameter dimension does not split over its mesh axes."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      n = math.prod(mesh.shape[a] for a in names)
      if size % n:
        raise UsageError(
            f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')} "
            f"{tuple(leaf.shape)}: dimension {dim} ({size}) is not divisible by its {n} "
            f"partitions over {'x'.join(names)}; choose sizes divisible by NUM_MODEL_PARTITIONS "
            "(MLP_DIM, EXPERT_MLP_DIM, NUM_HEADS x HEAD_DIM, NUM_EMBEDDINGS) or fewer partitions")


def _make_optimizer(name: str, kwargs: dict, step_offset: int = 0):
  """`make_optimizer(name, **kwargs)`; its errors (bad OPTIMIZER / OPTIMIZER_KWARGS) are
  UsageErrors. With `step_offset`, the transformation applies the schedule at update count
  + step_offset (the global step); the returned schedule is still the plain one, of the step."""
  try:
    tx, schedule = make_optimizer(name, **kwargs)
    if step_offset:
      shifted = lambda count: schedule(count + step_offset)
      tx, _ = make_optimizer(name, **dict(kwargs, learning_rate_schedule=shifted))
  except (ValueError, TypeError) as e:  # make_optimizer only validates its arguments here
    raise UsageError(f"OPTIMIZER / OPTIMIZER_KWARGS: {error_line(e)}") from None
  return tx, schedule


def _update_count(opt_state, default: int) -> int:
  """The optimizer's update count (the `count` of optax's and our Adafactor's states)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if path and getattr(path[-1], "name", None) == "count":
      return int(jax.device_get(leaf))
  return default


def _progress(enabled: bool, start: int, total: int):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _check_finite(step, metrics, ckpt):
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    ckpt.wait_until_finished()
    raise TrainingError(f"loss is {loss} at step {step}; stopped, the last good checkpoint "
                        f"(step {ckpt.latest_step()}) is kept")


def _log(writer, bar, step, metrics, sec_per_step, tokens_per_step, flops_per_token, peak, *,
         fail_on_nan, ckpt):
  if fail_on_nan:
    _check_finite(step, metrics, ckpt)
  metrics = jax.device_get(metrics)
  loss = float(metrics["loss"])
  tps = tokens_per_step / max(sec_per_step, 1e-9)
  out = dict(metrics, **{"perf/tokens_per_second": tps, "perf/seconds_per_step": sec_per_step,
                         "perf/mfu": tps * flops_per_token / peak})
  writer.write(step, out)
  if bar is not None:
    bar.n = step
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.refresh()
  return out
