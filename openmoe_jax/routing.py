"""Token-choice top-k routing math (flaxformer `TokensChooseMaskedRouter`), separate from dispatch.

Everything here is a pure function of router logits; `moe.py` turns a `Routing` into expert
inputs and outputs. Legend: G token groups, T tokens per group, E experts, K experts per token,
C expert capacity.
"""
import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp


def num_groups(num_tokens: int, group_size: int, num_experts: int, num_expert_replicas: int = 1) -> int:
  """Smallest n >= num_tokens // group_size with num_tokens % n == 0 and n % (E*replicas) == 0.

  Same rule as flaxformer `moe_layers._num_groups`, so groups split evenly across experts.
  """
  multiple = num_experts * num_expert_replicas
  n = max(num_tokens // group_size, multiple)
  while n < num_tokens and not (num_tokens % n == 0 and n % multiple == 0):
    n += 1
  if num_tokens % n or n % multiple:
    raise ValueError(f"cannot split {num_tokens} tokens into groups of at most {group_size} whose "
                     f"count is a multiple of num_experts*replicas={multiple}; use a token count "
                     f"divisible by {multiple}")
  return n


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float, *,
                    num_selected_experts: int = 2, min_capacity: int = 4,
                    formula: str = "flaxformer", no_drop: bool = False) -> int:
  """Slots per expert and group.

  'flaxformer': max(round(cf * G / E), min) -- note: no factor k, so top-2 choices are often
  dropped even under perfect balance (OpenMoE's setting). 'colossalai': floor(k * cf * G / E),
  rounded up to even, the released PyTorch port's formula. no_drop: G slots (a token picks an
  expert at most once), so nothing is dropped.
  """
  if no_drop:
    return tokens_per_group
  if formula == "flaxformer":
    capacity = int(round(capacity_factor * tokens_per_group / num_experts))
  elif formula == "colossalai":
    capacity = math.floor(num_selected_experts * capacity_factor * tokens_per_group / num_experts)
    capacity += capacity % 2
  else:
    raise ValueError(f"unknown capacity formula {formula!r}")
  return max(capacity, min_capacity)


@flax.struct.dataclass
class Routing:
  """Routing decisions of one MoE layer.

  Attributes:
    expert_index: int32[G, T, K] chosen experts, best first.
    position: int32[G, T, K] slot in the expert's buffer (may be >= C when dropped).
    kept: bool[G, T, K] assignment fits in the capacity.
    combine_weights: float32[G, T, K] gate of each kept assignment, 0 where dropped.
    router_probs: float32[G, T, E] softmax over all experts.
    aux_loss: float32[] load-balancing loss.
    router_z_loss: float32[] mean squared log-partition of the router logits.
    capacity: int, static.
  """
  expert_index: jax.Array
  position: jax.Array
  kept: jax.Array
  combine_weights: jax.Array
  router_probs: jax.Array
  aux_loss: jax.Array
  router_z_loss: jax.Array
  capacity: int = flax.struct.field(pytree_node=False)


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch/ST-MoE auxiliary loss, flaxformer form: E^2 * mean_{g,e}(f_ge * P_ge).

  Args:
    router_probs: float32[G, T, E].
    expert_index: int32[G, T, K]; f_ge is the fraction of tokens whose top-k contains e.
  """
  num_experts = router_probs.shape[-1]
  chosen = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
  tokens_fraction = jnp.mean(chosen, axis=-2)
  prob_fraction = jnp.mean(router_probs.astype(jnp.float32), axis=-2)
  return jnp.mean(tokens_fraction * prob_fraction) * num_experts**2


def router_z_loss(router_logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. float32[G, T, E] -> []."""
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(log_z**2)


def priority_positions(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """Slot of every assignment when all first choices go before any second choice, left to right.

  Args:
    expert_index: int32[G, T, K].
  Returns:
    int32[G, T, K] 0-based position of each assignment in its expert's queue.
  """
  g, t, k = expert_index.shape
  # [G, K*T]: all top-1 choices in token order, then all top-2 choices, ...
  ordered = jnp.swapaxes(expert_index, 1, 2).reshape(g, k * t)
  mask = jax.nn.one_hot(ordered, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(mask, axis=1) - 1) * mask, axis=-1)
  return jnp.swapaxes(position.reshape(g, k, t), 1, 2)


def _top_k(probs: jax.Array, k: int):
  """top_k by k rounds of argmax (lowest index wins ties, as lax.top_k).

  lax.top_k lowers to a sort/custom call that the SPMD partitioner all-gathers across the
  sharded group axis; argmax is a plain reduction and stays local. k is small (OpenMoE: 2).
  """
  gates, index = [], []
  remaining = probs
  for _ in range(k):
    i = jnp.argmax(remaining, axis=-1)
    gates.append(jnp.take_along_axis(probs, i[..., None], axis=-1)[..., 0])
    index.append(i.astype(jnp.int32))
    remaining = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=bool), -jnp.inf, remaining)
  return jnp.stack(gates, axis=-1), jnp.stack(index, axis=-1)


def top_k_routing(router_logits: jax.Array, num_selected_experts: int, capacity: int, *,
                  renormalize_gates: bool = False) -> Routing:
  """Softmax over all experts, then top-k; capacity by first-choice-first, left-to-right priority.

  Args:
    router_logits: float32[G, T, E].
    num_selected_experts: K.
    capacity: C slots per expert and group.
    renormalize_gates: divide the K gates by their sum (OpenMoE: no).
  """
  router_logits = router_logits.astype(jnp.float32)
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits, axis=-1)
  gates, expert_index = _top_k(probs, num_selected_experts)
  if renormalize_gates:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  position = priority_positions(expert_index, num_experts)
  kept = position < capacity
  return Routing(
      expert_index=expert_index,
      position=position,
      kept=kept,
      combine_weights=jnp.where(kept, gates, 0.0),
      router_probs=probs,
      aux_loss=load_balancing_loss(probs, expert_index),
      router_z_loss=router_z_loss(router_logits),
      capacity=capacity,
  )
