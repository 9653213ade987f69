"""Token-choice routers: how router logits become chosen experts, gates and balancing losses.

One table (`SCORES`, `BALANCE_LOSSES`) chosen by `ModelConfig.router_score` and
`ModelConfig.balance_loss` (gin `ROUTER_SCORE`, `BALANCE_LOSS`), every entry with the same
signature, so the capacity modes, dispatch, decoding, export and `openmoe-analyze` (all through
`routing.route`) work with each. Everything runs in float32. Legend: G token groups, T tokens per
group, E experts, K experts per token, S sequences of L tokens (G * T = S * L).

Scores (`score`, then `select`, then `gates`):
  'softmax'           softmax over all E logits; gates are the selected probabilities (OpenMoE,
                      flaxformer `TokensChooseMaskedRouter`; Switch / ST-MoE).
  'softmax_selected'  selection by logit; gates are the softmax over the K selected logits only
                      (Mixtral, transformers `MixtralSparseMoeBlock`: softmax, top-k, divide by
                      the sum, which is the same function).
  'sigmoid'           sigmoid of each logit (DeepSeek-V3, arXiv:2412.19437 eq. 15); the gates
                      are renormalised over the selected experts when `renormalize_gates` is set
                      (DeepSeek-V3's `norm_topk_prob`).
After the gates: times `routed_scaling_factor` (DeepSeek-V2/V3's `routed_scaling_factor`).

Selection: the K largest of score + expert_bias (the bias enters the choice only, never the
gates: auxiliary-loss-free balancing, DeepSeek-V3 section 2.1.2), optionally group-limited:
with `num_expert_groups` groups of E / groups experts, a group scores the sum of its two best
experts (`expert_group_score='max'`: its best one, DeepSeek-V2), and only the `topk_groups`
best groups may be chosen from (DeepSeek-V3's node-limited routing, transformers `DeepseekV3TopkRouter`; they mask the other groups' scores to 0, we to
-inf, so a masked expert is never chosen even when biased scores are negative). Ties go to the
lowest index, as `lax.top_k`.

Balancing losses (each multiplied by `aux_loss_factor` in the training loss):
  'switch'    E^2 * mean over groups and experts of f_ge * P_ge, f the fraction of the group's
              tokens whose top-k holds e and P the mean routing probability (Switch Transformer;
              flaxformer `_load_balancing_loss`, OpenMoE's).
  'sequence'  the same per sequence of L tokens, averaged over sequences, with DeepSeek-V3's
              normalisation: f_i = E / (K L) * count_i, P_i the mean normalised score (eq. 17-20).
  'global'    f and P over the whole batch (every group, on every device: under SPMD the means
              are global), E * sum_e f_e P_e (Megatron-Core `global_aux_loss`; Qwen3's
              global-batch balancing, arXiv:2501.11873). With microbatches, per microbatch.
P uses the scores normalised over the experts (for softmax, the probabilities themselves).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from openmoe_jax.model.config import BALANCE_LOSSES, ROUTER_SCORES


class Choice(NamedTuple):
  """A router's decision before capacity. probs: float32[G, T, E] the scores normalised over
  the experts (what the balancing losses and the analyses read); gates: float32[G, T, K];
  expert_index: int32[G, T, K], best first."""
  probs: jax.Array
  gates: jax.Array
  expert_index: jax.Array


def top_k(values: jax.Array, k: int):
  """(values, indices) of the k largest along the last axis, by k rounds of argmax (lowest index
  wins ties, as lax.top_k). lax.top_k lowers to a sort that the SPMD partitioner all-gathers
  across the sharded group axis; argmax is a plain reduction and stays local."""
  picked, index = [], []
  remaining = values
  for _ in range(k):
    i = jnp.argmax(remaining, axis=-1)
    picked.append(jnp.take_along_axis(values, i[..., None], axis=-1)[..., 0])
    index.append(i.astype(jnp.int32))
    remaining = jnp.where(jax.nn.one_hot(i, values.shape[-1], dtype=bool), -jnp.inf, remaining)
  return jnp.stack(picked, axis=-1), jnp.stack(index, axis=-1)


def pick(values: jax.Array, index: jax.Array) -> jax.Array:
  """values[..., index] for int32[..., K] index, one size-1 gather per choice level: the
  backward of a K-wide gather is a scatter, which XLA:TPU v5p/v6e offload to the SparseCore,
  where the compiler's cost model times nothing."""
  return jnp.stack([jnp.take_along_axis(values, index[..., j:j + 1], axis=-1)[..., 0]
                    for j in range(index.shape[-1])], axis=-1)


def score(logits: jax.Array, kind: str) -> jax.Array:
  """float32[..., E] logits -> the scores experts are chosen by (softmax or sigmoid)."""
  logits = logits.astype(jnp.float32)
  if kind in ("softmax", "softmax_selected"):
    return jax.nn.softmax(logits, axis=-1)
  if kind == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"unknown router score {kind!r}; choose from {ROUTER_SCORES}")


def group_mask(choice_scores: jax.Array, num_groups: int, topk_groups: int,
               group_score: str = "top2_sum") -> jax.Array:
  """bool[..., E]: experts in the `topk_groups` best of `num_groups` equal groups, a group
  scored by the sum of its two best experts (one when a group has one expert; 'top2_sum',
  DeepSeek-V3) or by its best expert ('max', DeepSeek-V2's `group_limited_greedy`)."""
  *lead, e = choice_scores.shape
  grouped = choice_scores.reshape(*lead, num_groups, e // num_groups)
  best, _ = top_k(grouped, 1 if group_score == "max" else min(2, e // num_groups))
  _, chosen = top_k(jnp.sum(best, axis=-1), topk_groups)           # [..., topk_groups]
  keep = jnp.max(jax.nn.one_hot(chosen, num_groups, dtype=jnp.int32), axis=-2) > 0
  return jnp.repeat(keep, e // num_groups, axis=-1)


def select(scores: jax.Array, k: int, *, bias: Optional[jax.Array] = None, num_groups: int = 0,
           topk_groups: int = 0, group_score: str = "top2_sum"):
  """(the chosen experts' scores, int32[..., K] the experts) with the k largest scores (+ bias,
  for the choice only), within the allowed groups when num_groups > 0."""
  choice = scores
  if bias is not None:  # [E], broadcast over the leading axes
    choice = choice + bias.astype(jnp.float32).reshape((1,) * (scores.ndim - 1) + (-1,))
  if num_groups:
    choice = jnp.where(group_mask(choice, num_groups, topk_groups, group_score), choice,
                       -jnp.inf)
  if choice is scores:  # OpenMoE's path: top_k's own picks are the scores
    return top_k(scores, k)
  index = top_k(choice, k)[1]
  return pick(scores, index), index


def choose(logits: jax.Array, k: int, *, kind: str = "softmax", renormalize: bool = False,
           scaling_factor: float = 1.0, bias: Optional[jax.Array] = None, num_groups: int = 0,
           topk_groups: int = 0, group_score: str = "top2_sum") -> Choice:
  """float32[G, T, E] logits -> `Choice` for router score `kind` (module docstring)."""
  logits = logits.astype(jnp.float32)
  scores = score(logits, kind)
  picked, expert_index = select(scores, k, bias=bias, num_groups=num_groups,
                                topk_groups=topk_groups, group_score=group_score)
  if kind == "softmax_selected":
    gates = jax.nn.softmax(pick(logits, expert_index), axis=-1)
  elif renormalize:
    gates = picked / (jnp.sum(picked, axis=-1, keepdims=True) + (1e-20 if kind == "sigmoid" else 0))
  else:
    gates = picked
  if scaling_factor != 1.0:
    gates = gates * scaling_factor
  probs = scores if kind != "sigmoid" else scores / jnp.sum(scores, axis=-1, keepdims=True)
  return Choice(probs=probs, gates=gates, expert_index=expert_index)


def _chosen(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """float32[..., E]: 1 where the token's top-k holds the expert."""
  return jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)


def switch_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch/ST-MoE auxiliary loss, flaxformer form: E^2 * mean_{g,e}(f_ge * P_ge).

  Args:
    probs: float32[G, T, E].
    expert_index: int32[G, T, K]; f_ge is the fraction of tokens whose top-k contains e.
  """
  num_experts = probs.shape[-1]
  tokens_fraction = jnp.mean(_chosen(expert_index, num_experts), axis=-2)
  prob_fraction = jnp.mean(probs.astype(jnp.float32), axis=-2)
  return jnp.mean(tokens_fraction * prob_fraction) * num_experts**2


def sequence_loss(probs: jax.Array, expert_index: jax.Array, seq_len: int) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (eq. 17-20) without its alpha, averaged over the
  S sequences of `seq_len` tokens the G * T tokens form: sum_e f_e * P_e with
  f_e = E / (K L) * (assignments to e in the sequence), P_e = mean normalised score."""
  num_experts, k = probs.shape[-1], expert_index.shape[-1]
  seq_probs = probs.astype(jnp.float32).reshape(-1, seq_len, num_experts)
  counts = jnp.sum(jax.nn.one_hot(expert_index.reshape(-1, seq_len, k), num_experts,
                                  dtype=jnp.float32), axis=(1, 2))        # [S, E]
  f = counts * num_experts / (k * seq_len)
  return jnp.mean(jnp.sum(f * jnp.mean(seq_probs, axis=1), axis=-1))


def global_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """The Switch loss with f and P over every token of the batch: E * sum_e f_e P_e."""
  num_experts = probs.shape[-1]
  f = jnp.mean(_chosen(expert_index, num_experts).reshape(-1, num_experts), axis=0)
  prob = jnp.mean(probs.astype(jnp.float32).reshape(-1, num_experts), axis=0)
  return jnp.sum(f * prob) * num_experts


def balance_loss(kind: str, probs: jax.Array, expert_index: jax.Array,
                 seq_len: Optional[int] = None) -> jax.Array:
  """The balancing loss `kind` (BALANCE_LOSSES) of a choice; 'sequence' needs seq_len, the
  tokens per sequence of the [G, T] block (G * T a multiple of it)."""
  if kind == "switch":
    return switch_loss(probs, expert_index)
  if kind == "global":
    return global_loss(probs, expert_index)
  if kind == "sequence":
    if not seq_len:
      raise ValueError("the 'sequence' balance loss needs the sequence length")
    return sequence_loss(probs, expert_index, seq_len)
  raise ValueError(f"unknown balance loss {kind!r}; choose from {BALANCE_LOSSES}")
