"""`openmoe-score`: per-token log-probabilities of text lines under a trained checkpoint.

    openmoe-score --model_dir=runs/quickstart --input_file=lines.txt --output_file=scores.jsonl

Each output line: {"text", "token_ids", "log_probs"} where log_probs[i] = ln p(token_ids[i] |
BOS, token_ids[:i]) (BOS = id 0 at the first input position), under the eval routing settings
(eval capacity factor). Lines are scored one at a time, padded to a multiple of the expert count,
so a line's scores do not depend on its neighbours. Partial output goes to O.tmp and is renamed
when complete.
"""
import argparse
import json
import os
import sys

from openmoe_jax import cli, gin_utils, run_dir


def read_text_lines(path: str) -> list:
  """The file's lines without line ends; UsageError naming the file, line and byte offset of
  the first line that is not UTF-8."""
  lines = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        lines.append(raw.decode("utf-8").rstrip("\r\n"))
      except UnicodeDecodeError as e:
        raise gin_utils.UsageError(f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} "
                                   f"at column {e.start + 1})") from None
  return lines


def _vocabulary(model_dir: str, task: str):
  import tasks  # noqa: F401  registers tasks
  from openmoe_jax import data
  name = task or run_dir.run_info(model_dir).get("mixture_or_task_name")
  if not name:
    raise gin_utils.UsageError("cannot tell the vocabulary: pass --mixture_or_task_name")
  try:
    return data.get_provider(name).output_features["targets"].vocabulary
  except ValueError as e:
    raise gin_utils.UsageError(gin_utils.error_line(e)) from None


def score_lines(cfg, params, vocabulary, lines):
  """Yields (ids, log_probs) per line."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from openmoe_jax import steps
  fn = jax.jit(lambda p, b: steps.token_log_probs(p, b, cfg=cfg))
  multiple = max(cfg.num_experts, 1) * cfg.num_expert_replicas
  for line in lines:
    ids = list(vocabulary.encode(line))
    n = len(ids)
    # Power-of-two buckets bound recompilation; the group rule needs a multiple of E.
    length = max(multiple, 1 << (max(n, 1) - 1).bit_length())
    length = -(-length // multiple) * multiple
    targets = np.zeros((1, length), np.int32)
    targets[0, :n] = ids
    inputs = np.zeros_like(targets)
    inputs[0, 1:n] = ids[:n - 1] if n > 1 else []
    batch = {"decoder_input_tokens": jnp.asarray(inputs), "decoder_target_tokens": jnp.asarray(targets),
             "decoder_loss_weights": jnp.asarray(targets > 0, jnp.float32)}
    logp = np.asarray(fn(params, batch))[0, :n]
    yield ids, [float(x) for x in logp]


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="openmoe-score", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_dir_flags(parser)
  parser.add_argument("--input_file", required=True, help="UTF-8 text, one input per line")
  parser.add_argument("--output_file", required=True, help="JSON lines to write")
  parser.add_argument("--mixture_or_task_name",
                      help="task whose vocabulary to use (default: the one the run trained on)")
  try:
    args, overrides = cli.parse_tool_args(parser, argv)
  except gin_utils.UsageError as e:
    print(f"openmoe-score: error: {gin_utils.error_line(e)}", file=sys.stderr)
    return 2
  tmp = args.output_file + ".tmp"
  try:
    if not os.path.isfile(args.input_file):
      raise gin_utils.UsageError(f"input file not found: {args.input_file}")
    cfg = run_dir.load_model_config(args.model_dir, overrides)
    params, step = run_dir.load_params(args.model_dir, args.step)
    vocabulary = _vocabulary(args.model_dir, args.mixture_or_task_name)
    lines = read_text_lines(args.input_file)
    with open(tmp, "w") as out:
      for line, (ids, logp) in zip(lines, score_lines(cfg, params, vocabulary, lines)):
        out.write(json.dumps({"text": line, "token_ids": ids, "log_probs": logp}) + "\n")
    os.replace(tmp, args.output_file)
  except gin_utils.UsageError as e:
    print(f"openmoe-score: error: {gin_utils.error_line(e)}", file=sys.stderr)
    return 2
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(f"scored {len(lines)} lines with step {step} -> {args.output_file}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
