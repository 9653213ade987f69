"""Evaluation over a held-out split: loss, perplexity, token accuracy, and the unigram baseline.

The host loop around the jitted `steps.eval_step`; used by the training loop and openmoe-eval.
"""
import math
from typing import Dict, Optional

import jax
import numpy as np

from openmoe_jax.data import corpus
from openmoe_jax.data import pipeline as data_lib
from openmoe_jax.evaluation.unigram import add_counts, unigram_cross_entropy


def evaluate(params, eval_fn, iterator, batch_sharding, num_batches: int,
             token_counts: Optional[np.ndarray] = None) -> Dict[str, float]:
  """Loss, perplexity and token accuracy over `num_batches` validation batches.

  token_counts: when given, the evaluated target ids are added to it (for the unigram baseline).
  """
  totals: Dict[str, float] = {}
  for _, batch in zip(range(num_batches), iterator):
    if token_counts is not None:
      add_counts(token_counts, batch)
    out = jax.device_get(eval_fn(params, data_lib.to_global_arrays(batch, batch_sharding)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.get("weight", 0.0), 1.0)
  loss = totals.get("ce_sum", 0.0) / n
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
          "eval/token_accuracy": totals.get("correct", 0.0) / n}


def evaluate_and_report(params, eval_fn, batch_sh, step, writer, say, train_counts, iterator,
                         eval_steps) -> Dict[str, float]:
  """Evaluates, writes the metrics (with the unigram baseline and the data-cleaning counts) and
  prints one line."""
  eval_counts = np.zeros_like(train_counts)
  ev = evaluate(params, eval_fn, iterator, batch_sh, eval_steps, token_counts=eval_counts)
  if train_counts.sum():
    ev["eval/unigram_cross_entropy"] = unigram_cross_entropy(train_counts, eval_counts)
  skipped = corpus.skipped_document_counts()
  ev.update({f"data/{k}_documents": float(v) for k, v in skipped.items()})
  writer.write(step, ev)
  line = (f"step {step}: eval loss {ev['eval/loss']:.4f}, perplexity "
          f"{ev['eval/perplexity']:.2f}, token accuracy {ev['eval/token_accuracy']:.3f}")
  if "eval/unigram_cross_entropy" in ev:
    line += f" (unigram baseline {ev['eval/unigram_cross_entropy']:.2f})"
  if any(skipped.values()):
    line += (f"; documents so far: {skipped['empty']} empty, {skipped['invalid_utf8']} "
             f"invalid UTF-8 and {skipped['missing_field']} without the text field skipped, "
             f"{skipped['truncated']} truncated")
  say(line)
  return ev
