"""Plan a TPU run on any machine: compile the training step with XLA:TPU for a slice.

`openmoe-info --tpu=v3-256 ...` and `openmoe-train ... --compile_only --tpu=v3-256` call `plan`,
which compiles, from abstract shapes only, exactly the step `train()` jits (model, mesh,
batch, microbatches, remat, optimizer) for the compile-only devices of the slice (`tpu.py`),
and reports the compiler's view of it:

* memory per device (XLA:TPU's buffer assignment): arguments, outputs, temporaries, peak;
  `fits` against the budget (the chip's HBM unless given) and the headroom;
* the compiler's time estimate of the *whole* step. XLA's cost analysis counts a loop body
  once, so the microbatch loop is handled explicitly: the optimizer update (which runs once per
  step) is compiled on its own, and
      whole step = update + num_microbatches x (compiled step - update)
  where "compiled step" is the step's `optimal_seconds` (one microbatch's forward and backward,
  the accumulation, and the update). Where this libtpu's cost model gives no time (v5p, v6e:
  `optimal_seconds` < 0) the same sum is taken of the roofline max(flops / peak FLOP/s,
  bytes accessed / HBM bandwidth) of XLA's counts, and `estimate_method` says so. Tokens/s and MFU follow (MFU against the generation's peak
  bf16 FLOP/s, with the analytic 6N + attention FLOPs of `openmoe-info`). These are **compiler
  estimates**: nothing here has run on a TPU;
* the collectives of the optimized HLO per kind, executions and bytes per step (`hlo_stats`).
"""
import json
import math
import sys
import time
from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.model import attention
from openmoe_jax.model import grouped
from openmoe_jax.model import moe
from openmoe_jax.model import ragged_dispatch
from openmoe_jax.planning import target
from openmoe_jax.planning import tpu
from openmoe_jax.model import counts
from openmoe_jax.planning import hlo_stats
from openmoe_jax.training import run_setup
from openmoe_jax.training import state_layout as layout


ESTIMATE_NOTE = ("compiler estimate: XLA:TPU cost analysis (optimal_seconds, else the roofline "
                 "of its flops and bytes), whole step = update + microbatches x (step - update); "
                 "nothing ran on a TPU")


def _resolve_auto(cfg, generation=None):
  """'auto' choices as a TPU run makes them (the trace happens on a CPU host)."""
  with target.compiling_for("tpu", generation):
    return cfg.replace(dispatch=moe.resolve_dispatch(cfg.dispatch),
                       grouped_matmul=grouped.resolve(cfg.grouped_matmul),
                       expert_exchange=ragged_dispatch.resolve_exchange(cfg.expert_exchange))


def shapes_digest(abstract_state) -> str:
  """A short hash of every state leaf's path, shape, dtype and partition spec."""
  import hashlib
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}:{a.sharding.spec}"
                  for p, a in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(cfg, slice_name: str, *, num_expert_partitions: int, num_model_partitions: int,
         batch_size: int, seq_len: int, num_microbatches: int = 1, optimizer: str = "adafactor",
         optimizer_kwargs=None, memory_budget_gib=None, seed: int = 0,
         num_expert_replicas=None, rules=None, with_hlo: bool = False) -> dict:
  """Compiles the train step for the slice; returns the plan (see the module docstring), with
  the optimized HLO text under "hlo" when `with_hlo`. The step is set up by
  `training.run_setup.build`, as `train()` sets up its own.

  Configuration errors (unknown slice, mesh, experts, batch, groups) raise UsageError.
  """
  s = tpu.parse_slice(slice_name)
  added = tpu.compile_host(s)
  try:
    with target.compiling_for("tpu", s.generation):  # its checks as a TPU run makes them
      run = run_setup.build(
          cfg, batch_size=batch_size, seq_len=seq_len,
          num_expert_partitions=num_expert_partitions, num_model_partitions=num_model_partitions,
          num_microbatches=num_microbatches, optimizer=optimizer,
          optimizer_kwargs=optimizer_kwargs, num_expert_replicas=num_expert_replicas, rules=rules,
          devices=tpu.slice_devices(s), batch_name="batch size",
          where=f" on {slice_name} ({s.num_devices} devices)")
    return _plan(run, s, seed=seed, with_hlo=with_hlo, memory_budget_gib=memory_budget_gib)
  finally:
    tpu.restore_environment(added)  # the process is not a TPU worker afterwards


def _plan(run, s, *, seed, with_hlo, memory_budget_gib):
  import jax
  mesh, tx, schedule = run.mesh, run.tx, run.schedule
  batch_size, seq_len, num_microbatches = run.batch_size, run.seq_len, run.num_microbatches
  optimizer = run.optimizer
  devices = list(mesh.devices.flat)
  # Token counts that do not split into routing groups are padded by the MoE layer (flaxformer).
  cfg = _resolve_auto(run.cfg, s.generation)
  # ATTENTION_IMPL='auto' depends on the shapes too: resolved here as the TPU trace resolves it.
  shards = math.prod(mesh.shape.values())  # batch over (data, expert), heads over model
  with target.compiling_for("tpu", s.generation):
    try:  # a kernel this generation cannot compile: one line
      attention.check_run(cfg, seq_len)
    except ValueError as e:
      raise UsageError(f"{error_line(e)} (--tpu={tpu.accelerator_type(s)})") from None
    cfg = cfg.replace(attention_impl=attention.resolve(
        cfg, batch=batch_size // num_microbatches, q_len=seq_len, kv_len=seq_len,
        platform="tpu", shards=shards))
  t = time.perf_counter()
  budget = int(memory_budget_gib * 2**30) if memory_budget_gib else s.hbm_bytes_per_device
  with target.compiling_for("tpu", s.generation):
    lowered, abstract = layout.lower_train_step(
        cfg, tx, schedule, mesh, batch_size=batch_size, length=seq_len,
        num_microbatches=num_microbatches, seed=seed, rules=run.rules)
    try:
      step = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return _over_hbm(e, s, devices, mesh, cfg, batch_size, seq_len, num_microbatches,
                       optimizer, budget, time.perf_counter() - t)
    update = layout.lower_update(tx, mesh, abstract, run.rules).compile()
  seconds = time.perf_counter() - t
  step_cost, update_cost = layout.cost(step), layout.cost(update)
  whole = lambda key: (update_cost.get(key, 0.0) + num_microbatches *
                       max(step_cost.get(key, 0.0) - update_cost.get(key, 0.0), 0.0))
  # libtpu's cost model gives no time (optimal_seconds < 0) for some programs: on v5p and v6e
  # any with a scatter offloaded to the SparseCore, on v4 and v6e OpenMoE-size steps (it
  # returns negative values, not additive); then the estimate is the roofline of XLA's own
  # FLOP and byte counts.
  roofline = max(whole("flops") / s.peak_flops_per_device,
                 whole("bytes accessed") / s.hbm_bandwidth_per_device)
  has_time = min(step_cost.get("optimal_seconds", -1), update_cost.get("optimal_seconds", -1)) > 0
  est = whole("optimal_seconds") if has_time else roofline
  method = ("xla optimal_seconds" if has_time else
            "roofline of XLA's flops and bytes accessed (this libtpu's cost model gives no time "
            f"for this step on {s.generation})")
  # Pallas splash kernels are custom calls without a cost estimate: XLA counts neither their
  # FLOPs nor their time. Their FLOPs are added at the chip's bf16 peak (a lower bound).
  splash_flops = 0.0
  if cfg.attention_impl == "splash":
    splash_flops = attention.splash_train_flops(cfg, batch_size, seq_len) / len(devices)
    est += splash_flops / s.peak_flops_per_device
    roofline += splash_flops / s.peak_flops_per_device
    method += (" + the splash attention kernels' FLOPs at the bf16 peak (XLA cannot see inside "
               "them: a lower bound)")
  tokens = batch_size * seq_len
  flop_counts = counts.summarize(cfg, seq_len)
  model_flops = flop_counts["train_flops_per_token"] * tokens
  causal_flops = model_flops - flop_counts["attention_flops_per_token"] * tokens / 2
  mem = layout.memory(step)
  device = devices[0]
  out = {
      "backend": "tpu", "accelerator_type": tpu.accelerator_type(s), "topology": s.topology,
      "device_kind": device.device_kind, "num_devices": len(devices),
      "hbm_bytes_per_device": s.hbm_bytes_per_device,
      "peak_bf16_flops_per_device": s.peak_flops_per_device,
      "mesh": dict(mesh.shape), "batch_size": batch_size, "seq_len": seq_len,
      "num_microbatches": num_microbatches, "optimizer": optimizer,
      "remat_policy": cfg.remat_policy, "dispatch": cfg.dispatch, "capacity_mode": cfg.capacity_mode,
      "grouped_matmul": cfg.grouped_matmul, "attention_impl": cfg.attention_impl,
      "expert_exchange": cfg.expert_exchange,
      "compile_seconds": round(seconds, 1),
      **mem,
      "memory_budget_bytes": budget, "fits": mem["peak_bytes_per_device"] <= budget,
      "headroom_bytes": budget - mem["peak_bytes_per_device"],
      "headroom_fraction": 1 - mem["peak_bytes_per_device"] / budget,
      "estimate_note": ESTIMATE_NOTE,
      "estimated_step_seconds": est,
      "estimated_tokens_per_second": tokens / est if est else 0.0,
      "estimated_mfu": model_flops / (est * len(devices) * s.peak_flops_per_device) if est else 0.0,
      "estimated_mfu_causal":
          causal_flops / (est * len(devices) * s.peak_flops_per_device) if est else 0.0,
      "estimated_update_seconds": update_cost.get("optimal_seconds", 0.0) if has_time else None,
      "estimate_method": method,
      "roofline_step_seconds": roofline,
      "splash_flops_per_device": splash_flops,
      "xla_bytes_accessed_per_device": whole("bytes accessed"),
      "xla_flops_per_device": whole("flops"),
      "model_flops_per_step": model_flops,
      "collectives": hlo_stats.collectives(step.as_text()),
      "num_params": sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"])),
      "state_shapes_digest": shapes_digest(abstract),
  }
  if with_hlo:
    out["hlo"] = step.as_text()
  return out


def _over_hbm(err, s, devices, mesh, cfg, batch_size, seq_len, num_microbatches, optimizer,
              budget, seconds) -> dict:
  """XLA:TPU refuses to compile a program whose buffers exceed the HBM: the plan says so, with
  the temporaries the compiler reported as a lower bound of the peak."""
  import re
  m = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])", str(err))
  temp = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))) if m else 0
  return {
      "backend": "tpu", "accelerator_type": tpu.accelerator_type(s), "topology": s.topology,
      "device_kind": devices[0].device_kind, "num_devices": len(devices),
      "hbm_bytes_per_device": s.hbm_bytes_per_device,
      "peak_bf16_flops_per_device": s.peak_flops_per_device, "mesh": dict(mesh.shape),
      "batch_size": batch_size, "seq_len": seq_len, "num_microbatches": num_microbatches,
      "optimizer": optimizer, "remat_policy": cfg.remat_policy, "dispatch": cfg.dispatch,
      "capacity_mode": cfg.capacity_mode, "grouped_matmul": cfg.grouped_matmul,
      "attention_impl": cfg.attention_impl, "expert_exchange": cfg.expert_exchange,
      "compile_seconds": round(seconds, 1), "temp_bytes_per_device": temp,
      "peak_bytes_per_device": max(temp, s.hbm_bytes_per_device + 1),
      "memory_budget_bytes": budget, "fits": False,
      "headroom_bytes": budget - max(temp, s.hbm_bytes_per_device + 1),
      "compile_error": str(err).splitlines()[0][:300],
      "estimate_note": ESTIMATE_NOTE, "estimated_step_seconds": None,
      "estimated_tokens_per_second": None, "estimated_mfu": None,
      "estimated_mfu_causal": None, "collectives": None,
  }


def report(out: dict, prog: str) -> int:
  """Prints the plan; 3 (and one line on stderr) when the peak is over the budget."""
  print(json.dumps(out, indent=2))
  if not out["fits"]:
    print(f"{prog}: error: per-device peak {out['peak_bytes_per_device'] / 2**30:.2f} GiB exceeds "
          f"the budget of {out['memory_budget_bytes'] / 2**30:.2f} GiB on {out['accelerator_type']}",
          file=sys.stderr)
    return 3
  return 0
