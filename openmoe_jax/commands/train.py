"""`openmoe-train`: t5x-style command line for the gin-configured training loop.

    openmoe-train --gin_file=quickstart.gin
    openmoe-train --gin_file=models/openmoe_8b.gin --gin_file=runs/pretrain.gin \\
        --gin.MODEL_DIR="'/data/run1'" --gin.MIXTURE_OR_TASK_NAME="'mix_ul2'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 1024, 'targets': 1024}" \\
        --gin.TRAIN_STEPS=500000 --gin.BATCH_SIZE=1024

Multi-host: pass --coordinator_address, --process_count and --process_index on every process, or
let a launcher set them in the environment (launch/, docs/launch.md; `distributed_settings`).
"""
import sys

from openmoe_jax.commands import cli
from openmoe_jax.errors import UsageError


def main(argv=None):
  cli.start_command(argv)
  from openmoe_jax import gin_utils  # late: JAX after the flags (quick --help)
  parser = cli.build_parser("openmoe-train", __doc__)
  from openmoe_jax.commands import compile_only as tpu_plan  # late: JAX after the flags
  tpu_plan.add_flags(parser, compile_only=True)
  argv = sys.argv[1:] if argv is None else argv

  def body() -> int:
    dot, rest = gin_utils.split_gin_dot_flags(argv)
    args = parser.parse_args(rest)
    if not args.gin_file:
      raise UsageError("--gin_file is required, e.g. --gin_file=quickstart.gin")
    if args.compile_only or args.tpu:
      return tpu_plan.compile_only_command(args, dot)
    cli.init_distributed(args)
    import tasks  # noqa: F401  registers the seqio tasks the run gins name
    from openmoe_jax.commands import configurables  # late: JAX after the flags; `train`, gin-bound
    # Names every %gin.REQUIRED macro left unset in one line (gin itself stops at the first).
    gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot, args.gin_search_paths)
    cfg = gin_utils.model_config()
    cli.print_start_line()
    result = configurables.train(cfg, partitioning_rules=gin_utils.partitioning_rules())
    import jax
    if jax.process_index() == 0:
      print(summary(result), file=sys.stderr, flush=True)
    return 0

  return cli.run("openmoe-train", body)


def _minutes(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m} min {s:02d} s" if m else f"{s} s"


def _continue_line(result: dict) -> str:
  """A run stopped before TRAIN_STEPS resumes with the same command; a finished one continues
  with a larger TRAIN_STEPS."""
  if result.get("stopped_by") or result["step"] < result["train_steps"]:
    return "  continue        the same command (it resumes from the newest checkpoint)"
  return f"  continue        the same command with --gin.TRAIN_STEPS={2 * result['train_steps']}"


def summary(result: dict) -> str:
  """The lines printed when training ends: what happened, where it is, what to run next."""
  d = result["model_dir"]
  train, ev = result.get("train") or {}, result.get("eval") or {}
  head = (f"openmoe-train: {'stopped' if result.get('stopped_by') else 'done'} at step "
          f"{result['step']} of {result['train_steps']} ({result['steps_run']} steps in "
          f"{_minutes(result['seconds'])})")
  lines = [head]
  if "loss" in train:
    lines.append(f"  train loss      {train['loss']:.4f}")
  if "eval/loss" in ev:
    line = (f"  held-out loss   {ev['eval/loss']:.4f} (perplexity {ev['eval/perplexity']:.1f}, "
            f"token accuracy {ev['eval/token_accuracy']:.3f})")
    if "eval/unigram_cross_entropy" in ev:
      line += f"; unigram baseline {ev['eval/unigram_cross_entropy']:.2f}"
    lines.append(line)
  lines += [f"  checkpoint      {result['checkpoint'] or 'none written'}",
            f"  metrics         {result['metrics_file']} (tensorboard --logdir {d})",
            "next:",
            _continue_line(result),
            f"  evaluate        openmoe-eval --gin.MODEL_DIR=\"'{d}'\"",
            f"  analyze routing openmoe-analyze --model_dir={d} --output_dir={d}/analysis",
            f"  export          openmoe-export --model_dir={d} --output_dir={d}_hf"]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
