"""`openmoe-score`: per-token log-probabilities of text lines under a trained checkpoint.

    openmoe-score --model_dir=runs/quickstart --input_file=lines.txt --output_file=scores.jsonl

Each output line: {"text", "token_ids", "log_probs"} where log_probs[i] = ln p(token_ids[i] |
BOS, token_ids[:i]) (BOS = id 0 at the first input position), under the eval routing settings
(eval capacity factor). Lines are scored one at a time, padded to a multiple of the expert count,
so a line's scores do not depend on its neighbours. Text is tokenized with --mixture_or_task_name's
vocabulary, else the one MODEL_DIR/vocabulary.json names (an imported model's), else that of
the task the run trained on. Partial output goes to O.tmp and is renamed when complete.
"""
import argparse
import json
import os
import sys

from openmoe_jax.errors import UsageError
from openmoe_jax.commands import cli
from openmoe_jax.training import run_dir
from openmoe_jax.evaluation.scoring import check_lengths, read_text_lines  # noqa: F401
from openmoe_jax.evaluation.scoring import score_lines  # noqa: F401


def _vocabulary(model_dir: str, task: str):
  import tasks  # noqa: F401  registers tasks
  from openmoe_jax.data import vocab  # late: seqio after the flags
  return vocab.resolve_vocabulary(model_dir, task)


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="openmoe-score", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_dir_flags(parser)
  parser.add_argument("--input_file", required=True, help="UTF-8 text, one input per line")
  parser.add_argument("--output_file", required=True, help="JSON lines to write")
  parser.add_argument("--mixture_or_task_name",
                      help="task whose vocabulary to use (default: the one MODEL_DIR's "
                           "vocabulary.json names, as openmoe-import records it, else the "
                           "task the run trained on)")
  parser.add_argument("--max_length", type=int,
                      help="longest line to score, in tokens (default: the run's training "
                           "sequence length); a longer line is refused before anything is scored")

  def body() -> int:
    args, overrides = cli.parse_tool_args(parser, argv)
    tmp = args.output_file + ".tmp"
    try:
      if not os.path.isfile(args.input_file):
        raise UsageError(f"input file not found: {args.input_file}")
      cli.check_output_file(args.output_file, input_file=args.input_file)
      cfg = run_dir.load_model_config(args.model_dir, overrides)
      if args.step is not None:
        run_dir.checkpoint_step(args.model_dir, args.step)  # a missing step: said first
      budget = run_dir.sequence_length(args.model_dir, args.max_length)
      vocabulary = _vocabulary(args.model_dir, args.mixture_or_task_name)
      lines = read_text_lines(args.input_file)
      check_lengths(lines, vocabulary, budget, args.input_file)
      params, step = run_dir.load_params(args.model_dir, args.step)
      with open(tmp, "w") as out:
        for line, (ids, logp) in zip(lines, score_lines(cfg, params, vocabulary, lines)):
          out.write(json.dumps({"text": line, "token_ids": ids, "log_probs": logp}) + "\n")
      os.replace(tmp, args.output_file)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    print(f"scored {len(lines)} lines with step {step} -> {args.output_file}", file=sys.stderr)
    return 0

  return cli.run("openmoe-score", body)


if __name__ == "__main__":
  sys.exit(main())
