"""Prints a few decoded examples of a seqio task or mixture, to check data before training.

  python -m openmoe_jax.inspect_data --mixture_or_task_name=builtin_mix --num_examples=3

Shows each example's inputs (mode prefix and `<extra_id_N>` sentinels visible) and targets as the
model sees them, before packing, with `</s>` for EOS; then the document-cleaning counts (empty,
invalid UTF-8, truncated). Bad arguments print one line and exit with status 2.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.commands import cli


class _Parser(argparse.ArgumentParser):

  def error(self, message):  # one line instead of usage + message
    self.exit(2, f"inspect_data: error: {message}\n")


def _feature_lengths(text: str) -> dict:
  try:
    pairs = [item.split(":") for item in text.split(",") if item]
    lengths = {k.strip(): int(v) for k, v in pairs}
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not like inputs:1024,targets:1024") from None
  if not lengths or any(k not in ("inputs", "targets") or v < 4 for k, v in lengths.items()):
    raise argparse.ArgumentTypeError(
        f"{text!r}: keys must be inputs/targets with lengths >= 4")
  return lengths


def _positive(text: str) -> int:
  value = int(text) if text.lstrip("-").isdigit() else -1
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m openmoe_jax.inspect_data",
              description="Print decoded examples of a seqio task or mixture.")
  p.add_argument("--mixture_or_task_name", required=True,
                 help="registered task or mixture, e.g. builtin_mix or redpajama_c4_ul2")
  p.add_argument("--num_examples", type=_positive, default=3, help="examples to print")
  p.add_argument("--split", default="train", help="dataset split (train or validation)")
  p.add_argument("--task_feature_lengths", type=_feature_lengths, default=None,
                 help="e.g. inputs:1024,targets:1024 (default; targets:2048 for *_full_lm)")
  p.add_argument("--seed", type=int, default=0, help="seed of shuffling and UL2 noise")
  p.add_argument("--shuffle", action="store_true", help="shuffle as training does")
  p.add_argument("--show_ids", action="store_true", help="also print the token ids")
  p.add_argument("--max_chars", type=_positive, default=600,
                 help="truncate each printed text to this many characters")
  for name, what in [("tfds_data_dir", "TFDS data dir with OpenMoE's builders"),
                     ("redpajama_dir", "RedPajama-1T download (JSONL)"),
                     ("the_stack_dir", "The Stack dedup download (parquet)"),
                     ("wikipedia_dir", "Wikipedia-en as JSONL or text")]:
    p.add_argument(f"--{name}", default=None, help=f"{what}; overrides gin / $OPENMOE_*")
  p.add_argument("--umt5_spm_path", default=None,
                 help="umT5 SentencePiece model for the OpenMoE tasks")
  return p


def _default_lengths(name: str) -> dict:
  return {"targets": 2048} if name.endswith("full_lm") else {"inputs": 1024, "targets": 1024}


def render(ids: Sequence[int], vocabulary) -> str:
  """Decodes ids, spelling sentinels `<extra_id_N>`, EOS `</s>` and padding `<pad>`."""
  out, run = [], []
  first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids

  def flush():
    if run:
      out.append(vocabulary.decode(run))
      run.clear()

  for i in map(int, ids):
    special = ("</s>" if i == vocabulary.eos_id else "<pad>" if i == 0 else
               f"<extra_id_{vocabulary.vocab_size - 1 - i}>" if i >= first_sentinel else None)
    if special:
      flush()
      out.append(special)
    else:
      run.append(i)
  flush()
  return "".join(out)


def _apply_locations(args) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  for name in ("tfds_data_dir", "redpajama_dir", "the_stack_dir", "wikipedia_dir"):
    if getattr(args, name):
      gin.bind_parameter(f"tasks.sources.data_dirs.{name}", getattr(args, name))
  if args.umt5_spm_path:
    gin.bind_parameter("openmoe_jax.vocab.umt5_spm_path.path", args.umt5_spm_path)


def inspect(args, out=None) -> None:
  """Prints `args.num_examples` examples of `args.mixture_or_task_name` (to stdout)."""
  out = out or sys.stdout
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from openmoe_jax.data import pipeline as data  # late: JAX after the flags
  from tasks import sources  # pylint: disable=g-import-not-at-top
  provider = data.get_provider(args.mixture_or_task_name)
  _apply_locations(args)
  lengths = args.task_feature_lengths or _default_lengths(args.mixture_or_task_name)
  vocabulary = provider.output_features["targets"].vocabulary
  ds = provider.get_dataset(lengths, split=args.split, shuffle=args.shuffle, seed=args.seed,
                            num_epochs=1)
  for n, ex in enumerate(ds.take(args.num_examples).as_numpy_iterator()):
    print(f"=== example {n} ===", file=out)
    for key in ("inputs", "targets"):
      if key in ex:
        text = render(ex[key], vocabulary)
        clipped = text if len(text) <= args.max_chars else text[:args.max_chars] + " [...]"
        print(f"--- {key} ({len(ex[key])} tokens) ---\n{clipped}", file=out)
        if args.show_ids:
          print(f"ids: {ex[key].tolist()}", file=out)
  stats = {k: v.snapshot() for k, v in sources.SOURCE_STATS.items()}
  print(f"=== document cleaning counts: {stats} ===", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.start_command(argv)
  args = build_parser().parse_args(argv)

  def body() -> int:
    try:
      inspect(args)
    except Exception as e:  # pylint: disable=broad-except
      # User errors (bad name, missing data or model, TF read errors) end in one line; bugs
      # don't.
      if not (isinstance(e, (ValueError, OSError, ImportError))
              or type(e).__module__.startswith("tensorflow")):
        raise
      raise UsageError(error_line(e)) from None
    return 0

  return cli.run("inspect_data", body)


if __name__ == "__main__":
  sys.exit(main())
