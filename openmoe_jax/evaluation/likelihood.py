"""Log-likelihood of continuations after contexts: multiple choice by scoring (lm-eval-harness).

A (context, continuation) pair is tokenized as a whole and split where the context's own
tokens end, so a continuation keeps the tokenization it has in running text (SentencePiece would
otherwise add a word-start marker before it). Rows [BOS] + context + continuation are scored in
batches of `batch_size`, padded to power-of-two lengths (one compilation per length bucket),
under the eval routing settings; contexts lose tokens from the left to fit the length budget.
"""
from typing import List, Sequence, Tuple

import numpy as np
from openmoe_jax.evaluation import decoding
from openmoe_jax.training import steps


def split_pair(vocabulary, context: str, continuation: str) -> Tuple[List[int], List[int]]:
  """(context ids, continuation ids) of context + continuation encoded together."""
  ctx, whole = list(vocabulary.encode(context)), list(vocabulary.encode(context + continuation))
  common = 0
  while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
    common += 1
  common = min(common, len(whole) - 1) if whole else 0  # a continuation has >= 1 token
  return whole[:common], whole[common:]


def sequence_log_probs(params, cfg, rows: Sequence[Tuple[List[int], List[int]]], *,
                       batch_size: int = 16, mesh=None) -> List[float]:
  """Sum of ln p(continuation tokens | BOS, context, earlier continuation tokens) per row."""
  import jax
  import jax.numpy as jnp
  fn = jax.jit(lambda p, b: steps.token_log_probs(p, b, cfg=cfg))
  multiple = max(cfg.num_experts, 1) * cfg.num_expert_replicas
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["expert"]
    batch_size = -(-batch_size // shards) * shards
  out = []
  with decoding._mesh_context(mesh):  # pylint: disable=protected-access
    params = decoding.place_params(params, cfg, mesh)
    for first in range(0, len(rows), batch_size):
      chunk = rows[first:first + batch_size]
      longest = max(len(c) + len(x) for c, x in chunk)
      length = -(-decoding.bucket(longest) // multiple) * multiple
      targets = np.zeros((batch_size, length), np.int32)
      weights = np.zeros((batch_size, length), np.float32)
      for i, (ctx, cont) in enumerate(chunk):
        ids = ctx + cont
        targets[i, :len(ids)] = ids
        weights[i, len(ctx):len(ids)] = 1.0
      inputs = np.zeros_like(targets)
      inputs[:, 1:] = targets[:, :-1]
      batch = {"decoder_input_tokens": jnp.asarray(inputs),
               "decoder_target_tokens": jnp.asarray(targets),
               "decoder_loss_weights": jnp.asarray(weights)}
      logp = np.asarray(jax.device_get(fn(params, batch)), np.float64)
      out.extend((logp * weights).sum(axis=1)[:len(chunk)].tolist())
  return out


def choice_scores(params, cfg, vocabulary, contexts: Sequence[str],
                  choices: Sequence[Sequence[str]], *, budget: int, batch_size: int = 16,
                  mesh=None):
  """Per example, per choice: (sum of log-probs of the choice, characters of the choice)."""
  rows, sizes = [], []
  for context, options in zip(contexts, choices):
    for option in options:
      ctx, cont = split_pair(vocabulary, context, option)
      room = max(budget - len(cont), 1)
      rows.append((ctx[max(len(ctx) - room, 0):] if len(ctx) > room else ctx, cont[:budget]))
    sizes.append(len(options))
  flat = sequence_log_probs(params, cfg, rows, batch_size=batch_size, mesh=mesh)
  out, k = [], 0
  for context_choices, n in zip(choices, sizes):
    out.append([(flat[k + j], len(context_choices[j])) for j in range(n)])
    k += n
  return out
