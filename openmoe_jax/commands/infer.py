"""`openmoe-infer`: completions of prompts by a trained checkpoint (t5x `infer.py` conventions).

    openmoe-infer --model_dir=runs/quickstart --input_file=prompts.txt --output_file=out.jsonl
    openmoe-infer --model_dir=D --mixture_or_task_name=builtin_function_name \\
        --output_file=out.jsonl --temperature=0.7 --top_p=0.9 --seed=1
    openmoe-infer --model_dir=D --input_file=prompts.txt --output_file=out.jsonl --num_beams=4

Prompts come from --input_file (UTF-8 text, one prompt per line; or, for .jsonl / .json, one
JSON object per line with a "prompt" field) or from the "inputs" of a seqio task's split. Each
output line: {"prompt", "completion", "completion_ids", "log_probs", "finish"} where log_probs[i]
= ln p(completion_ids[i] | BOS, prompt, completion_ids[:i]) under the model (temperature 1),
finish is 'eos', 'stop' or 'length', plus "target" for task examples. --num_beams=N > 1 runs
t5x's beam search instead: the row is the best of N beams, ranked by --length_penalty_alpha.
Decoding uses a KV cache (openmoe_jax/evaluation/decoding.py) under the eval routing settings; --no_drop
gives every expert room for all tokens, so results do not depend on the batch (cached decoding
then equals re-running the whole prefix). --chat_template wraps prompts in OpenMoE-Chat's
template and stops at "</s>" written as text. Model settings take t5x's form, --gin.NAME=VALUE
with a model macro or ModelConfig.FIELD (e.g. --gin.EVAL_EXPERT_CAPACITY_FACTOR=4.0), or
--model_override FIELD=VALUE.
Text is tokenized with the task's vocabulary (--mixture_or_task_name), else the one
MODEL_DIR/vocabulary.json names (an imported model's), else that of the task the run trained on;
a row ends at that vocabulary's EOS. Partial output goes to O.tmp and is renamed when complete.
"""
import argparse
import json
import logging
import math
import os
import sys

from openmoe_jax.errors import UsageError
from openmoe_jax.commands import cli
from openmoe_jax.training import run_dir
from openmoe_jax.data import chat

UsageError = UsageError


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="openmoe-infer", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_dir_flags(parser)  # --model_dir, --step, --gin.NAME=VALUE, --model_override
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--input_file", help="prompts: UTF-8 text lines, or JSON lines with a "
                   "\"prompt\" field when the name ends in .jsonl / .json")
  src.add_argument("--mixture_or_task_name",
                   help="prompt with the \"inputs\" of this registered seqio task instead")
  parser.add_argument("--split", default="validation", help="task split (default validation)")
  parser.add_argument("--num_examples", type=int, help="task: at most this many examples")
  parser.add_argument("--output_file", required=True, help="JSON lines to write")
  parser.add_argument("--max_new_tokens", type=int, default=64,
                      help="tokens to generate at most per prompt, EOS included (default 64)")
  parser.add_argument("--max_length", type=int, help="length budget: BOS + prompt + "
                      "max_new_tokens must fit (default: the run's training sequence length)")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 (default) decodes greedily; > 0 samples from softmax(logits / T)")
  parser.add_argument("--top_k", type=int, default=0,
                      help="sample among the k most likely tokens only (0, default: all)")
  parser.add_argument("--top_p", type=float, default=1.0,
                      help="sample within the smallest set of tokens holding this probability "
                           "mass (nucleus; 1.0, default: all)")
  parser.add_argument("--seed", type=int, default=0,
                      help="sampling seed (results are fixed for a seed and --batch_size)")
  parser.add_argument("--num_beams", type=int, default=1,
                      help="1 (default): greedy or sampled decoding as set above; N > 1: beam "
                           "search keeping the N best partial completions per prompt, in "
                           "--batch_size x N rows: N times the cache and the work of greedy "
                           "decoding (leave --temperature, --top_k and --top_p at their "
                           "defaults)")
  parser.add_argument("--length_penalty_alpha", type=float, default=0.6,
                      help="beam search ranks finished beams by log-prob / ((5 + n) / 6) ** "
                           "alpha, n = generated tokens with the EOS: 0 ranks by log-prob "
                           "(favours short completions), larger favours longer ones (default "
                           "0.6, as t5x; only with --num_beams > 1)")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="prompts decoded together (default 8); rounded up to the devices")
  parser.add_argument("--no_drop", action="store_true",
                      help="expert capacity = group size: no token is ever dropped, so a "
                           "prompt's result does not depend on the other prompts of its batch")
  parser.add_argument("--chat_template", action="store_true",
                      help="wrap prompts in OpenMoE-Chat's LLaMA-2-style template and stop at "
                           "\"</s>\" written as text")
  parser.add_argument("--system_prompt", default="", help="--chat_template: the system prompt")
  return parser


def read_prompts(path: str) -> list:
  """Prompts of a text or JSON-lines file; UsageError naming the file and line when bad."""
  if not os.path.isfile(path):
    raise UsageError(f"input file not found: {path}")
  jsonl = path.endswith((".jsonl", ".json"))
  prompts = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError:
        raise UsageError(f"{path}:{number}: not valid UTF-8") from None
      if not jsonl:
        prompts.append(line)
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        raise UsageError(f"{path}:{number}: not a JSON object") from None
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UsageError(f"{path}:{number}: no string \"prompt\" field")
      prompts.append(row["prompt"])
  if not prompts:
    raise UsageError(f"input file {path} has no prompts")
  return [{"prompt": p} for p in prompts]


def _vocabulary(model_dir: str, task):
  import tasks  # noqa: F401  registers tasks
  from openmoe_jax.data import vocab  # late: seqio after the flags
  return vocab.resolve_vocabulary(model_dir, task)


def length_budget(model_dir: str, explicit) -> int:
  return run_dir.sequence_length(model_dir, explicit)


def encode_prompts(rows, vocabulary, args, budget: int) -> list:
  encoded = []
  for number, row in enumerate(rows, 1):
    ids = (chat.prompt_ids(vocabulary, row["prompt"], args.system_prompt) if args.chat_template
           else list(vocabulary.encode(row["prompt"])))
    if 1 + len(ids) + args.max_new_tokens > budget:
      where = f"{args.input_file}:{number}" if args.input_file else f"example {number}"
      raise UsageError(f"{where}: prompt of {1 + len(ids)} tokens (BOS included) + "
                       f"--max_new_tokens={args.max_new_tokens} exceeds the length budget "
                       f"{budget} (--max_length)")
    encoded.append(ids)
  return encoded


def run(args, overrides=None) -> tuple:
  """Checks everything, then decodes; yields nothing to disk. Returns (rows, step)."""
  import jax
  from openmoe_jax.evaluation import decoding  # late: JAX after the flags
  from openmoe_jax.evaluation import downstream  # late: JAX after the flags
  from openmoe_jax.model import partitioning  # late: JAX after the flags
  try:
    sampling = decoding.Sampling(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if args.max_new_tokens < 1 or args.batch_size < 1:
    raise UsageError("--max_new_tokens and --batch_size must be >= 1")
  if args.num_beams < 1:
    raise UsageError(f"--num_beams must be >= 1, got {args.num_beams}")
  if args.num_beams > 1 and sampling != decoding.Sampling():
    raise UsageError("--num_beams > 1 is a deterministic search: leave --temperature, --top_k "
                     "and --top_p at their defaults")
  if not math.isfinite(args.length_penalty_alpha):
    raise UsageError(f"--length_penalty_alpha must be finite, got {args.length_penalty_alpha}")
  if not args.input_file:
    import tasks  # noqa: F401  registers the tasks prompts come from (slow: TensorFlow)
  rows = (read_prompts(args.input_file) if args.input_file else
          downstream.prompt_rows(args.mixture_or_task_name, args.split, args.num_examples))
  overrides = dict(overrides or {}, **({"no_drop": True} if args.no_drop else {}))
  cfg = run_dir.load_model_config(args.model_dir, overrides)
  decoding.check_causal(cfg)
  vocabulary = _vocabulary(args.model_dir, args.mixture_or_task_name)
  budget = length_budget(args.model_dir, args.max_length)
  params, step = run_dir.load_params(args.model_dir, args.step)
  prompts = encode_prompts(rows, vocabulary, args, budget)
  stops = chat.stop_sequences(vocabulary) if args.chat_template else ()
  # The vocabulary's EOS ends a row (1 for OpenMoE's; a Hugging Face tokenizer's own; none: -1).
  eos_id = -1 if vocabulary.eos_id is None else int(vocabulary.eos_id)
  mesh = partitioning.make_mesh()
  params = decoding.place_params(params, cfg, mesh)  # once, not per batch
  key = jax.random.key(args.seed)
  from tqdm import tqdm
  bar = tqdm(total=len(prompts), desc="openmoe-infer", unit="prompt", file=sys.stderr,
             disable=len(prompts) <= args.batch_size, dynamic_ncols=True)
  for first in range(0, len(prompts), args.batch_size):
    chunk = prompts[first:first + args.batch_size]
    if args.num_beams > 1:
      gens = decoding.beam_search(params, cfg, chunk, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, alpha=args.length_penalty_alpha,
                                  eos_id=eos_id, stop_sequences=stops,
                                  batch_size=args.batch_size, mesh=mesh)
    else:
      gens = decoding.generate(params, cfg, chunk, max_new_tokens=args.max_new_tokens,
                               sampling=sampling, rng=jax.random.fold_in(key, first),
                               eos_id=eos_id, stop_sequences=stops,
                               batch_size=args.batch_size, mesh=mesh)
    for row, gen in zip(rows[first:first + args.batch_size], gens):
      text, ids, logp = vocabulary.decode(gen.ids), gen.ids, gen.log_probs
      finish = gen.finish
      if args.chat_template:
        text, ids, logp = chat.cut_at_eos_text(vocabulary, ids, logp)
        finish = "stop" if len(ids) < len(gen.ids) else finish
      row.update(completion=text, completion_ids=ids, log_probs=logp, finish=finish)
    bar.update(len(chunk))
  bar.close()
  return rows, step


def main(argv=None):
  cli.quiet_libraries()
  # orbax warns through absl that a params-only restore finds no item metadata file: not news.
  logging.getLogger("absl").setLevel(logging.ERROR)
  if argv is None:  # a console command, not a call from Python
    cli.filter_native_stderr()
  parser = build_parser()
  tmp = []

  def body() -> int:
    args, overrides = cli.parse_tool_args(parser, argv)
    cli.check_output_file(args.output_file, input_file=args.input_file)
    tmp.append(args.output_file + ".tmp")
    rows, step = run(args, overrides)
    with open(tmp[0], "w") as out:
      for row in rows:
        out.write(json.dumps(row) + "\n")
    os.replace(tmp[0], args.output_file)
    print(f"openmoe-infer: {len(rows)} completions from step {step} -> {args.output_file}",
          file=sys.stderr)
    return 0

  try:
    return cli.run("openmoe-infer", body)
  finally:
    if tmp and os.path.exists(tmp[0]):
      os.remove(tmp[0])


if __name__ == "__main__":
  sys.exit(main())
