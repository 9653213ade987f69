"""Quick-start training step: tokens/s, MFU against a large matmul measured in the same run,
host-side overhead per step, data-pipeline headroom, and checkpoint save time.

    .venv/bin/python benchmarks/train_step.py [--steps 20] [--gin_file quickstart.gin]

Prints one JSON object. MFU = tokens/s x train FLOPs per token (openmoe-info's count) / the
FLOP/s of a 2048^3 float32 matmul timed here.
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", default="quickstart.gin", help="run gin to benchmark")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra gin binding, e.g. \"BATCH_SIZE = 32\" (repeatable)")
  args = parser.parse_args()

  import jax
  from flax import linen as nn
  import tasks  # noqa: F401
  from openmoe_jax import gin_utils
  from openmoe_jax.commands import configurables  # noqa: F401  the run gins bind `train`
  from openmoe_jax.commands.compile_only import train_settings
  from openmoe_jax.training import checkpoint
  from openmoe_jax.model import counts
  from openmoe_jax.data import pipeline as data
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.training import loop as train
  from openmoe_jax.training import run_setup
  from openmoe_jax.training import state_layout as layout
  gin_utils.parse_gin([args.gin_file], args.gin_bindings)
  # The step exactly as openmoe-train sets it up from the same gin files.
  s = train_settings()
  bs, lengths, name = s["batch_size"], s["task_feature_lengths"], s["mixture_or_task_name"]
  length = sum(lengths.values())
  run = run_setup.build(
      gin_utils.model_config(), batch_size=bs, seq_len=length,
      num_expert_partitions=s["num_expert_partitions"],
      num_model_partitions=s["num_model_partitions"], num_microbatches=s["num_microbatches"],
      optimizer=s["optimizer"], optimizer_kwargs=s["optimizer_kwargs"],
      num_expert_replicas=s["num_expert_replicas"], rules=gin_utils.partitioning_rules())
  cfg = run.cfg
  state_sh, _ = run.state_layout(s["seed"])
  batch_sh = run.batch_sharding()
  step_fn = layout.jit_train_step(cfg, run.tx, run.schedule, state_sh, batch_sh,
                                  num_microbatches=run.num_microbatches, seed=s["seed"])
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    state = jax.jit(lambda r: part.unbox(run.init_fn(r)), out_shardings=state_sh)(
        jax.random.key(s["seed"]))
    it = data.make_iterator(name, lengths, bs)
    staged = [data.to_global_arrays(next(it), batch_sh) for _ in range(4)]
    state, m = step_fn(state, staged[0])
    jax.block_until_ready(m)
    # Compiled step alone, on batches already on the device.
    device_times = []
    for i in range(args.steps):
      t = time.perf_counter()
      state, m = step_fn(state, staged[i % 4])
      jax.block_until_ready(m)
      device_times.append(time.perf_counter() - t)
    # The loop as train() runs it: fetch from the pipeline, put on device, fetch metrics late.
    t = time.perf_counter()
    prev = None
    for _ in range(args.steps):
      state, m = step_fn(state, data.to_global_arrays(next(it), batch_sh))
      if prev is not None:
        jax.device_get(prev)
      prev = m
    jax.device_get(prev)
    loop_time = (time.perf_counter() - t) / args.steps
    # Data pipeline alone.
    t = time.perf_counter()
    for _ in range(args.steps):
      next(it)
    data_time = (time.perf_counter() - t) / args.steps
    d = tempfile.mkdtemp()
    ck = checkpoint.Checkpointer(d, max_to_keep=1)
    t = time.perf_counter()
    ck.save(1, state, it.get_state(), force=True)
    ck.wait_until_finished()
    save_time = time.perf_counter() - t
    ck.close()
    shutil.rmtree(d)
  step_time = statistics.median(device_times)
  tokens = bs * length
  flops_tok = counts.summarize(cfg, seq_len=length)["train_flops_per_token"]
  peak = train.matmul_peak_flops(2048, 10)
  out = {
      "gin_file": args.gin_file, "backend": jax.default_backend(), "devices": jax.device_count(),
      "tokens_per_step": tokens, "train_flops_per_token": flops_tok,
      "compiled_step_seconds": step_time, "loop_step_seconds": loop_time,
      "tokens_per_second": tokens / loop_time,
      "achieved_flops": tokens * flops_tok / step_time, "matmul_peak_flops": peak,
      "mfu_compiled_step": tokens * flops_tok / step_time / peak,
      "mfu_loop": tokens * flops_tok / loop_time / peak,
      "host_overhead_fraction": max(0.0, (loop_time - step_time) / loop_time),
      "data_pipeline_tokens_per_second": tokens / data_time,
      "data_headroom": (tokens / data_time) / (tokens / loop_time),
      "checkpoint_save_seconds": save_time,
  }
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
