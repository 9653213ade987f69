"""The unigram baseline: the cross-entropy a model that knows only token frequencies reaches.

A language model whose held-out loss is not clearly below this has learned nothing beyond token
frequencies. Counts come from the train split, scored on held-out tokens, add-one smoothing.
"""
import numpy as np


def token_counts(batches, vocab_size: int) -> np.ndarray:
  """float64[vocab_size]: how often each id is a (loss-weighted) target in `batches`."""
  counts = np.zeros(vocab_size, np.float64)
  for b in batches:
    add_counts(counts, b)
  return counts


def add_counts(counts: np.ndarray, batch) -> None:
  """Adds one batch's target ids (where the loss weight is positive) to `counts` in place."""
  ids = batch["decoder_target_tokens"][batch["decoder_loss_weights"] > 0]
  counts += np.bincount(np.minimum(ids, len(counts) - 1).reshape(-1), minlength=len(counts))


def unigram_cross_entropy(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
  """Cross-entropy (nats/token) of eval tokens under the add-one-smoothed train unigram model."""
  p = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
  return float(-(eval_counts * np.log(p)).sum() / max(eval_counts.sum(), 1.0))
