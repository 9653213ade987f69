"""Baselines of the two built-in eval tasks, for docs/inference.md: what a model must beat.

    .venv/bin/python benchmarks/builtin_eval_baselines.py [--num_examples=N]

* builtin_next_line: chance (25%), and a unigram model (token frequencies of the corpus's train
  split, add-one smoothing) scoring each choice exactly as openmoe-eval scores with a model
  (same tokenization, same metrics).
* builtin_function_name: always answering the most frequent function name of the train split.
Prints JSON.
"""
import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_examples", type=int, help="first N validation examples (all)")
  args = parser.parse_args(argv)
  import tasks  # noqa: F401
  from openmoe_jax.data import corpus
  from openmoe_jax.evaluation import downstream
  from openmoe_jax.evaluation import likelihood
  from openmoe_jax.evaluation import metrics
  from openmoe_jax.data import vocab
  voc = vocab.builtin_vocabulary()
  counts = np.ones(voc.vocab_size, np.float64)  # add-one smoothing
  for path in corpus.list_files("train"):
    ids = voc.tokenizer.encode(open(path, encoding="utf-8", errors="replace").read())
    counts += np.bincount(ids, minlength=voc.vocab_size)[:voc.vocab_size]
  logp = np.log(counts / counts.sum())

  mc = downstream.read_examples("builtin_next_line", "validation", args.num_examples)
  scores = [[(float(logp[likelihood.split_pair(voc, ex["inputs"], c)[1]].sum()), len(c))
             for c in ex["choices"]] for ex in mc]
  unigram = metrics.multiple_choice([ex["label"] for ex in mc], scores)

  names = downstream.read_examples("builtin_function_name", "validation", args.num_examples)
  train = downstream.read_examples("builtin_function_name", "train")
  common = collections.Counter(ex["targets"].strip() for ex in train).most_common(1)[0][0]
  guess = [common.replace("_", " ")] * len(names)
  targets = [ex["answers"] for ex in names]
  print(json.dumps({
      "builtin_next_line": {"num_examples": len(mc), "chance_accuracy": 25.0,
                            "unigram": unigram},
      "builtin_function_name": {"num_examples": len(names), "most_frequent_name": common,
                                **metrics.exact_match(targets, guess), **metrics.f1(targets, guess)},
  }, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
