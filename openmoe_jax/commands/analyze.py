"""`openmoe-analyze`: the OpenMoE paper's routing analyses (paper §4, App. E-F) on any checkpoint.

    openmoe-analyze --model_dir=runs/quickstart --steps=100,200,300 \
        --mixture_or_task_name=builtin_corpus_full_lm,builtin_docstrings_full_lm \
        --num_tokens=100000 --output_dir=/tmp/analysis

Runs every checkpoint over the same N tokens of each task (eval mode, one forward pass per
capacity factor), records every MoE layer's router decisions in streaming counters and writes
O/routing_report.json plus PNG figures: expert load per task (+ coefficient of variation),
context-independent specialisation (token IDs vs position IDs vs uniform routing), drops by
position bin at each capacity factor, and top-1 agreement of every checkpoint with the last.
Load, specialisation and agreement use the routing at the model's eval capacity factor.

Expert-choice models (ROUTER='experts_choose': each expert takes its top-C tokens, a token
gets 0..E experts) get the same report: load counts the experts' picks, a token's top-1 expert
is the one with the highest gate among those that took it (tokens no expert took are left out
of specialisation and agreement, and counted), and drops are the tokens no expert took
(docs/routing_analysis.md).
"""
import argparse
import json
import os
import re
import sys


from openmoe_jax.errors import UsageError
from openmoe_jax.commands import cli
from openmoe_jax.model import config as config_lib
from openmoe_jax.training import run_dir
from openmoe_jax.evaluation.routing_report import REPORT  # noqa: F401
from openmoe_jax.evaluation.routing_report import analyze  # noqa: F401
from openmoe_jax.evaluation.routing_report import group_settings  # noqa: F401
from openmoe_jax.evaluation.routing_report import write_figures  # noqa: F401


def build_parser():
  parser = argparse.ArgumentParser(prog="openmoe-analyze", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  a = parser.add_argument
  a("--steps", help="comma-separated checkpoint steps, the last one is the reference for early "
                    "routing agreement (default: every checkpoint in MODEL_DIR)")
  a("--mixture_or_task_name", help="comma-separated tasks or mixtures to analyse "
                                   "(default: the one the run trained on)")
  a("--num_tokens", type=int, default=100_000,
    help="real tokens per task and checkpoint (default 100000); fewer if the split runs out")
  a("--task_feature_lengths", help="JSON, e.g. '{\"targets\": 128}' (default: the run's)")
  a("--seq_len", type=int, help="shorthand for --task_feature_lengths='{\"targets\": SEQ_LEN}'")
  a("--batch_size", type=int, help="rows per forward pass; sets the routing group size and so "
                                   "the capacity (default: the run's BATCH_SIZE, else 8)")
  a("--capacity_factors", help="comma-separated capacity factors at which to measure drops "
                               "(default: the model's train and eval capacity factors)")
  a("--split", default="train", help="dataset split (default train)")
  a("--seed", type=int, default=0, help="data shuffling seed (default 0)")
  a("--min_count", type=int, default=128,
    help="occurrences a token or position ID needs to count in specialisation (default 128)")
  a("--position_bins", type=int, default=16,
    help="bins of the drop-by-position curves (default 16)")
  a("--top_tokens", type=int, default=10, help="top token IDs listed per expert (default 10)")
  a("--output_dir", required=True, help="where routing_report.json and the figures go")
  cli.add_model_dir_flags(parser, step=False)
  a("--no_progress", action="store_true", help="hide the progress bar")
  return parser


def main(argv=None):
  cli.start_command(argv)

  def body() -> int:
    args, overrides = cli.parse_tool_args(build_parser(), argv)
    out = os.path.join(args.output_dir, REPORT)
    tmp = out + ".tmp"
    try:
      cfg = run_dir.load_model_config(args.model_dir, overrides)
      if not cfg.moe_layers:
        raise UsageError("the model has no MoE layer: nothing to analyse")
      from openmoe_jax.training import checkpoint  # late: JAX after the flags
      have = checkpoint.list_steps(args.model_dir)
      if args.steps and not re.fullmatch(r"\d+(,\d+)*", args.steps):
        raise UsageError(f"--steps must be comma-separated integers, got {args.steps!r}")
      steps = [int(x) for x in args.steps.split(",")] if args.steps else have
      missing = [s for s in steps if s not in have]
      if not steps or missing:
        raise UsageError(f"no checkpoint for steps {missing or steps} in "
                                   f"{args.model_dir} (have {have})")
      import tasks  # noqa: F401  registers tasks (slow: TensorFlow), so after the cheap checks
      from openmoe_jax.data import pipeline as data  # late: JAX after the flags
      info = run_dir.run_info(args.model_dir)
      names = (args.mixture_or_task_name or info.get("mixture_or_task_name") or "").split(",")
      names = [n for n in names if n]
      if not names:
        raise UsageError("pass --mixture_or_task_name")
      for n in names:
        try:
          data.get_provider(n)
        except ValueError:
          raise UsageError(f"unknown task or mixture {n!r}") from None
      if args.seq_len:
        lengths = {"targets": args.seq_len}
      elif args.task_feature_lengths:
        try:
          lengths = {str(k): int(v) for k, v in json.loads(args.task_feature_lengths).items()}
        except (ValueError, AttributeError):
          raise UsageError("--task_feature_lengths must be a JSON object of ints") from None
      else:
        lengths = info.get("task_feature_lengths") or {"targets": 128}
      cfs = ([float(x) for x in args.capacity_factors.split(",") if x] if args.capacity_factors
             else [cfg.train_capacity_factor, cfg.eval_capacity_factor])
      batch_size = args.batch_size or run_dir.batch_size(args.model_dir)
      for flag, value in (("--num_tokens", args.num_tokens), ("--batch_size", batch_size),
                          ("--position_bins", args.position_bins)):
        if value < 1:
          raise UsageError(f"{flag}={value}: must be a positive integer")
      if not cfs or min(cfs) <= 0:
        raise UsageError(f"--capacity_factors={args.capacity_factors}: must be positive "
                                   "numbers, comma-separated")
      group_settings(cfg, batch_size, sum(lengths.values()), cfs)  # fails early on a bad shape
      os.makedirs(args.output_dir, exist_ok=True)
      report = analyze(cfg, args.model_dir, sorted(steps), names, lengths, batch_size,
                       args.num_tokens, sorted(set(cfs)), split=args.split, seed=args.seed,
                       min_count=args.min_count, position_bins=args.position_bins,
                       top_tokens=args.top_tokens, progress_bar=not args.no_progress)
      report["settings"]["model_overrides"] = config_lib.overrides_text(overrides)
      report["figures"] = write_figures(report, args.output_dir)
      with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
      os.replace(tmp, out)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    print(f"analysed steps {report['settings']['steps']} on {', '.join(names)} -> {out}",
          file=sys.stderr)
    return 0

  return cli.run("openmoe-analyze", body, user_errors=(ValueError,))


if __name__ == "__main__":
  sys.exit(main())
