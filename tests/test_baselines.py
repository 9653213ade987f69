"""Unigram baseline against a hand computation."""
import numpy as np
import pytest

from openmoe_jax.commands import baselines


def test_unigram_cross_entropy_hand_computed():
  batches = [{"decoder_target_tokens": np.array([[1, 2, 2, 3]]),
              "decoder_loss_weights": np.array([[1, 1, 1, 0]])}]
  counts = baselines.token_counts(batches, 4)
  np.testing.assert_array_equal(counts, [0, 1, 2, 0])
  # Add-one: p = (c + 1) / (3 + 4) -> eval tokens {1: 1, 2: 2}.
  want = -(1 * np.log(2 / 7) + 2 * np.log(3 / 7)) / 3
  assert baselines.unigram_cross_entropy(counts, counts) == pytest.approx(want)
