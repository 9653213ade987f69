"""Reference numbers a trained model must beat: the unigram entropy of a task's targets.

    python -m openmoe_jax.baselines --mixture_or_task_name=builtin_mix_full_lm

A unigram model fitted on the train split's target tokens, scored on the validation split's
(cross-entropy in nats per token, add-one smoothing): a language model whose held-out loss is not
clearly below this has learned nothing beyond token frequencies.
"""
import argparse
import json
import sys

from openmoe_jax.evaluation.unigram import token_counts, unigram_cross_entropy
from openmoe_jax.commands import cli


def unigram_entropy(mixture_or_task_name: str, task_feature_lengths, *, batch_size: int = 16,
                    num_batches: int = 200, vocab_size=None) -> dict:
  import tasks  # noqa: F401
  from openmoe_jax.data import pipeline as data  # late: JAX after the flags
  vocab = data.get_provider(mixture_or_task_name).output_features["targets"].vocabulary
  size = vocab_size or vocab.vocab_size
  def take(split, n):
    it = data.make_iterator(mixture_or_task_name, task_feature_lengths, batch_size, split=split,
                            shuffle=split == "train", num_epochs=None if split == "train" else 1,
                            shard_index=0, num_shards=1)
    return token_counts((b for _, b in zip(range(n), it)), size)
  train, valid = take("train", num_batches), take("validation", num_batches)
  return {"mixture_or_task_name": mixture_or_task_name,
          "unigram_cross_entropy_nats": unigram_cross_entropy(train, valid),
          "train_tokens": int(train.sum()), "validation_tokens": int(valid.sum())}


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="python -m openmoe_jax.baselines", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixture_or_task_name", required=True, help="registered task or mixture")
  parser.add_argument("--targets_length", type=int, default=128, help="target row length")
  parser.add_argument("--num_batches", type=int, default=200, help="batches of 16 rows per split")
  args = parser.parse_args(argv)

  def body() -> int:
    out = unigram_entropy(args.mixture_or_task_name, {"targets": args.targets_length},
                          num_batches=args.num_batches)
    print(json.dumps(out, indent=2))
    return 0

  return cli.run("baselines", body, user_errors=(ValueError,))


if __name__ == "__main__":
  sys.exit(main())
