"""`openmoe-info`: builds a model from gin abstractly (no parameter memory) and prints its counts.

    openmoe-info --gin_file=models/openmoe_8b.gin
    openmoe-info --gin_file=models/tiny.gin --gin.NUM_EXPERTS=16
    openmoe-info --gin_file=quickstart.gin       # a run gin: only its model is read
    openmoe-info --gin_file=models/openmoe_8b.gin --compile --num_devices=256 \
        --num_expert_partitions=32 --num_model_partitions=8 --batch_size=1024 \
        --num_microbatches=8 --memory_budget_gib=16
    openmoe-info --gin_file=models/openmoe_8b.gin --compile --tpu=v3-256 \
        --num_expert_partitions=32 --num_model_partitions=8 --batch_size=1024 --num_microbatches=8

Prints one JSON object. Counts come from the parameter shapes of the Flax model itself. Run gins
(quickstart.gin, runs/*.gin, openmoe/*.gin) are accepted: only their model is read (the mesh and
batch come from the flags below) and their required run macros (MODEL_DIR, ...) need not be set.
With --compile it also lowers and compiles the full training step (with the optimizer the gins bind: OPTIMIZER, OPTIMIZER_KWARGS) for a
(data, expert, model) mesh on N fake CPU devices, from abstract shapes only, and adds the
per-device memory (argument, output, temporary) and FLOPs of the compiled program; it exits
with code 3 when the per-device peak exceeds --memory_budget_gib.
With --tpu=TYPE (a Cloud TPU type such as v3-256, or a topology such as v4:4x4x4) it compiles
with XLA:TPU (libtpu: pip install 'openmoe_jax[tpu]') for that slice instead, and adds the TPU
plan (`planning/plan.py`): memory against the chip's HBM (the default budget), the compiler's
estimate of the whole step's time, tokens/s and MFU, and the collectives per step.
"""
import argparse
import json
import sys

import jax

from openmoe_jax import gin_utils
from openmoe_jax.errors import UsageError
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.counts import summarize
from openmoe_jax.commands import cli
from openmoe_jax.planning import tpu


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="openmoe-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--seq_len", type=int, default=2048,
                      help="sequence length for the FLOPs and the compiled step (default 2048)")
  aot = parser.add_argument_group("ahead-of-time compilation of the training step")
  aot.add_argument("--compile", action="store_true", help="compile the training step too")
  aot.add_argument("--num_devices", type=int,
                   help="fake CPU devices to compile for (default: the devices present)")
  aot.add_argument("--num_expert_partitions", type=int, default=1, help="NUM_EXPERT_PARTITIONS")
  aot.add_argument("--num_model_partitions", type=int, default=1, help="NUM_MODEL_PARTITIONS")
  aot.add_argument("--batch_size", type=int, default=8, help="global batch in sequences")
  aot.add_argument("--num_microbatches", type=int, default=1, help="gradient accumulation steps")
  aot.add_argument("--memory_budget_gib", type=float,
                   help="fail (exit 3) when the per-device peak exceeds this (TPU v3: 16; with "
                        "--tpu the default is the chip's HBM)")
  from openmoe_jax.commands import compile_only as tpu_plan  # late: JAX after the flags
  tpu_plan.add_flags(parser, compile_only=False)

  def body() -> int:
    dot_bindings, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    if args.tpu and args.num_devices:
      raise UsageError("--tpu and --num_devices exclude each other: the slice sets "
                                 "the devices")
    if args.tpu:
      args.compile = True
      tpu.compile_host(tpu.parse_slice(args.tpu))
    if args.num_devices:  # before any backend starts: fake CPU devices
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", args.num_devices)
    if not args.gin_file:
      raise UsageError("--gin_file is required, e.g. --gin_file=models/openmoe_8b.gin")
    # Run gins bind `train`: register it. Not finalized, so unset run macros are not required.
    from openmoe_jax.commands import configurables  # noqa: F401  late: JAX after the flags; `train`
    gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot_bindings, args.gin_search_paths,
                        finalize=False)
    cfg = gin_utils.model_config()
    # The optimizer (and its kwargs) the run gins bind, as openmoe-train would build it.
    run = tpu_plan.train_settings()
    out = summarize(cfg, args.seq_len)
    if args.tpu:
      out.update(tpu_plan.plan(
          cfg, args.tpu, num_expert_partitions=args.num_expert_partitions,
          num_model_partitions=args.num_model_partitions, batch_size=args.batch_size,
          seq_len=args.seq_len, num_microbatches=args.num_microbatches,
          memory_budget_gib=args.memory_budget_gib, optimizer=run["optimizer"],
          optimizer_kwargs=run["optimizer_kwargs"],
          num_expert_replicas=run["num_expert_replicas"],
          rules=gin_utils.partitioning_rules()))
    elif args.compile:
      out.update(_compile(cfg, args, run))
    if args.tpu:
      return tpu_plan.report(out, "openmoe-info")
    print(json.dumps(out, indent=2))
    budget = args.memory_budget_gib
    if budget and out.get("peak_bytes_per_device", 0) > budget * 2**30:
      print(f"openmoe-info: error: per-device peak {out['peak_bytes_per_device'] / 2**30:.2f} GiB "
            f"exceeds the budget of {budget} GiB", file=sys.stderr)
      return 3
    return 0

  return cli.run("openmoe-info", body, user_errors=(ValueError,))


def _compile(cfg: ModelConfig, args, run_settings: dict) -> dict:
  """The training step compiled for a (data, expert, model) mesh of this process's devices,
  set up as the run would set it up (`training.run_setup.build`)."""
  from openmoe_jax.training import run_setup  # late: JAX after the flags
  from openmoe_jax.training import state_layout as layout  # late: JAX after the flags
  run = run_setup.build(
      cfg, batch_size=args.batch_size, seq_len=args.seq_len,
      num_expert_partitions=args.num_expert_partitions,
      num_model_partitions=args.num_model_partitions, num_microbatches=args.num_microbatches,
      optimizer=run_settings["optimizer"], optimizer_kwargs=run_settings["optimizer_kwargs"],
      num_expert_replicas=run_settings["num_expert_replicas"],
      rules=gin_utils.partitioning_rules(), batch_name="--batch_size")
  res = layout.compile_train_step(run.cfg, run.tx, run.schedule, run.mesh,
                                  batch_size=run.batch_size, length=run.seq_len,
                                  num_microbatches=run.num_microbatches, rules=run.rules)
  res["mesh"], res["optimizer"] = dict(run.mesh.shape), run.optimizer
  res["batch_size"], res["num_microbatches"] = run.batch_size, run.num_microbatches
  return res


if __name__ == "__main__":
  sys.exit(main())
