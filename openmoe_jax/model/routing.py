"""Token-choice top-k routing math (flaxformer `TokensChooseMaskedRouter`), separate from dispatch.

The router itself (scores, selection, gates, balancing losses) is `routers.py`; this module adds
capacity: queue orders, adaptive capacities and which assignments are kept. Everything here is a
pure function of router logits; `moe.py` turns a `Routing` into expert
inputs and outputs. Legend: G token groups, T tokens per group, E experts, K experts per token,
C expert capacity.
"""
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from openmoe_jax.model import routers
from openmoe_jax.model.config import CAPACITY_ORDERS


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


def token_padding(batch: int, length: int, multiple: int) -> tuple:
  """(extra rows, extra columns) that make batch * length a multiple of `multiple` (E x replicas).

  flaxformer `moe_layers._maybe_pad`: pad either the batch or the length axis, whichever needs
  fewer padding tokens (the length axis on a tie); the zero padding tokens are routed like any
  other token and sliced off after the combine. (0, 0) when no padding is needed.
  """
  tokens = batch * length
  if tokens % multiple == 0:
    return 0, 0
  rows = 1
  while (tokens + rows * length) % multiple:
    rows += 1
  cols = 1
  while (tokens + cols * batch) % multiple:
    cols += 1
  return (rows, 0) if cols * batch > rows * length else (0, cols)


def group_layout(cfg, batch: int, length: int) -> tuple:
  """(pad rows, pad columns, groups, tokens per group) of a [batch, length] token block, as the
  MoE layer routes it (flaxformer: pad to a multiple of E x replicas, then `num_groups`)."""
  pad_rows, pad_cols = token_padding(batch, length, cfg.num_experts * cfg.num_expert_replicas)
  tokens = (batch + pad_rows) * (length + pad_cols)
  groups = num_groups(tokens, cfg.group_size, cfg.num_experts, cfg.num_expert_replicas)
  return pad_rows, pad_cols, groups, tokens // groups


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
    position: int32[G, T, K] slot in the expert's buffer (may be >= C when dropped); 0 in the
      'dropless' mode, which has no buffers.
    kept: bool[G, T, K] assignment fits in the capacity.
    combine_weights: float32[G, T, K] gate of each kept assignment, 0 where dropped.
    router_probs: float32[G, T, E] the router's scores normalised over the experts (softmax:
      the probabilities).
    aux_loss: float32[] the balancing loss (`routers.BALANCE_LOSSES`).
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
  """Switch/ST-MoE auxiliary loss (`routers.switch_loss`, kept under its old name)."""
  return routers.switch_loss(router_probs, expert_index)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. float32[G, T, E] -> []."""
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(log_z**2)


def priority_positions(expert_index: jax.Array, num_experts: int,
                       order: Optional[jax.Array] = None) -> jax.Array:
  """Slot of every assignment in its expert's queue: all first choices before any second choice.

  Args:
    expert_index: int32[G, T, K].
    order: int32[G, K, T], the order in which each choice level's tokens queue (a permutation of
      0..T-1 per group and level); None is OpenMoE's left to right.
  Returns:
    int32[G, T, K] 0-based position of each assignment in its expert's queue.
  """
  g, t, k = expert_index.shape
  levels = jnp.swapaxes(expert_index, 1, 2)  # [G, K, T]
  if order is not None:
    levels = jnp.take_along_axis(levels, order, axis=2)
  # [G, K*T]: all top-1 choices in queue order, then all top-2 choices, ...
  mask = jax.nn.one_hot(levels.reshape(g, k * t), num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(mask, axis=1) - 1) * mask, axis=-1).reshape(g, k, t)
  if order is not None:
    position = jnp.take_along_axis(position, jnp.argsort(order, axis=2), axis=2)
  return jnp.swapaxes(position, 1, 2)


def queue_order(mode: str, gates: jax.Array, rng: Optional[jax.Array] = None):
  """Token order within each choice level for capacity assignment (`CAPACITY_ORDER`).

  'openmoe': left to right (None), which drops late tokens first (drop-towards-the-end);
  'random': a fresh random permutation per group and level (rng; fixed key 0 when None);
  'confidence': highest gate first (batch-prioritised routing), position-independent.

  Args:
    gates: float32[G, T, K] gates of the chosen experts.
  Returns:
    int32[G, K, T] or None.
  """
  if mode == "openmoe":
    return None
  g, t, k = gates.shape
  if mode == "random":
    rng = jax.random.key(0) if rng is None else rng
    return jnp.argsort(jax.random.uniform(rng, (g, k, t)), axis=2).astype(jnp.int32)
  if mode == "confidence":
    return jnp.argsort(-jnp.swapaxes(gates, 1, 2), axis=2, stable=True).astype(jnp.int32)
  raise ValueError(f"unknown capacity order {mode!r}; choose from {CAPACITY_ORDERS}")


def adaptive_capacities(expert_index: jax.Array, num_experts: int, budget: int) -> jax.Array:
  """Per-group, per-expert capacities sharing `budget` slots by load (water-filling).

  Each expert gets min(load, tau) slots with tau the largest level whose total fits the budget;
  the few slots left go, one each, to the lowest-numbered experts still above tau. So an expert
  overflows only when the whole group is over budget, and then the busiest experts lose first.

  Args:
    expert_index: int32[G, T, K].
    budget: slots per group (E x the fixed capacity, so compute equals fixed capacity's).
  Returns:
    int32[G, E] capacities, summing to min(budget, G's assignments) per group.
  """
  g, t, k = expert_index.shape
  load = jnp.sum(jax.nn.one_hot(expert_index.reshape(g, t * k), num_experts, dtype=jnp.int32),
                 axis=1)
  fits = lambda tau: jnp.sum(jnp.minimum(load, tau[:, None]), axis=1) <= budget

  def search(_, bounds):
    lo, hi = bounds
    mid = (lo + hi + 1) // 2
    ok = fits(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  steps = max(int(t).bit_length() + 1, 1)
  tau, _ = jax.lax.fori_loop(0, steps, search, (jnp.zeros((g,), jnp.int32),
                                                jnp.full((g,), t, jnp.int32)))
  base = jnp.minimum(load, tau[:, None])
  left = budget - jnp.sum(base, axis=1, keepdims=True)
  above = load > tau[:, None]
  extra = above & (jnp.cumsum(above.astype(jnp.int32), axis=1) <= left)
  return base + extra.astype(jnp.int32)


# ------------------------------------------------------------------ the capacity modes, in one place
# A new capacity mode changes config.CAPACITY_MODES and these three functions only.
def never_drops(cfg) -> bool:
  """True when every assignment is computed (no_drop, or the 'dropless' capacity mode)."""
  return bool(cfg.no_drop or cfg.capacity_mode == "dropless")


def uses_ragged_dispatch(cfg) -> bool:
  """True for the modes whose experts take variable token counts ('adaptive', 'dropless'):
  sort by expert, grouped FFN, unsort (`ragged_dispatch.py`); False for fixed expert buffers."""
  return cfg.capacity_mode != "fixed"


def group_capacity(cfg, tokens_per_group: int, capacity_factor: float) -> int:
  """Slots per expert and group for `cfg`'s capacity formula and mode."""
  return expert_capacity(tokens_per_group, cfg.num_experts, capacity_factor,
                         num_selected_experts=cfg.num_selected_experts,
                         min_capacity=cfg.min_expert_capacity, formula=cfg.capacity_formula,
                         no_drop=never_drops(cfg))


def route(cfg, router_logits: jax.Array, capacity: int,
          rng: Optional[jax.Array] = None, *, seq_len: Optional[int] = None,
          expert_bias: Optional[jax.Array] = None) -> "Routing":
  """`cfg`'s routing of float32[G, T, E] logits: its router (`routers.py`), queue order, and
  which assignments each capacity mode keeps. The MoE layer and openmoe-analyze both route
  through here. seq_len: tokens per sequence of the [G, T] block (the 'sequence' balance loss);
  expert_bias: float32[E] added to the scores for the choice only."""
  if cfg.router == "experts_choose":
    return experts_choose_routing(router_logits, capacity, score=cfg.router_score,
                                  scaling_factor=cfg.routed_scaling_factor)
  return top_k_routing(router_logits, cfg.num_selected_experts, capacity,
                       renormalize_gates=cfg.renormalize_gates, order=cfg.capacity_order,
                       rng=rng, adaptive=cfg.capacity_mode == "adaptive",
                       dropless=cfg.capacity_mode == "dropless",
                       score=cfg.router_score, scaling_factor=cfg.routed_scaling_factor,
                       num_groups=cfg.num_expert_groups, topk_groups=cfg.topk_groups,
                       group_score=cfg.expert_group_score, balance=cfg.balance_loss,
                       seq_len=seq_len, expert_bias=expert_bias)


def top_k_routing(router_logits: jax.Array, num_selected_experts: int, capacity: int, *,
                  renormalize_gates: bool = False, order: str = "openmoe",
                  rng: Optional[jax.Array] = None, adaptive: bool = False,
                  score: str = "softmax", scaling_factor: float = 1.0, num_groups: int = 0,
                  topk_groups: int = 0, group_score: str = "top2_sum", balance: str = "switch",
                  seq_len: Optional[int] = None,
                  expert_bias: Optional[jax.Array] = None, dropless: bool = False) -> Routing:
  """Router scores, top-k, then capacity by first-choice-first priority.

  The defaults are OpenMoE's: softmax over all experts, top-k, the Switch loss.

  Args:
    router_logits: float32[G, T, E].
    num_selected_experts: K.
    capacity: C slots per expert and group.
    renormalize_gates: divide the K gates by their sum (OpenMoE: no).
    order: queue order within a choice level, see `queue_order` (OpenMoE: 'openmoe').
    rng: key for order='random'.
    adaptive: share the group's E*C slots between experts by load (`adaptive_capacities`)
      instead of C each.
    score, scaling_factor, num_groups, topk_groups, group_score, expert_bias: the router
      (`routers.choose`).
    balance, seq_len: the balancing loss (`routers.balance_loss`).
    dropless: the 'dropless' capacity mode: every assignment kept and no queue positions
      computed (position 0: its grouped FFN has no slots; the [G, T*K, E] queue cumsum is what
      grows with E at fine-grained top-8, benchmarks/RESULTS.md).
  """
  router_logits = router_logits.astype(jnp.float32)
  num_experts = router_logits.shape[-1]
  choice = routers.choose(router_logits, num_selected_experts, kind=score,
                          renormalize=renormalize_gates, scaling_factor=scaling_factor,
                          bias=expert_bias, num_groups=num_groups, topk_groups=topk_groups,
                          group_score=group_score)
  gates, expert_index = choice.gates, choice.expert_index
  if dropless:
    position = jnp.zeros(expert_index.shape, jnp.int32)
    kept = jnp.ones(expert_index.shape, bool)
  elif adaptive:
    position = priority_positions(expert_index, num_experts, queue_order(order, gates, rng))
    caps = adaptive_capacities(expert_index, num_experts, num_experts * capacity)
    g = expert_index.shape[0]
    limit = jnp.take_along_axis(caps, expert_index.reshape(g, -1), axis=1)
    kept = position < limit.reshape(expert_index.shape)
  else:
    position = priority_positions(expert_index, num_experts, queue_order(order, gates, rng))
    kept = position < capacity
  return Routing(
      expert_index=expert_index,
      position=position,
      kept=kept,
      combine_weights=jnp.where(kept, gates, 0.0),
      router_probs=choice.probs,
      aux_loss=routers.balance_loss(balance, choice.probs, expert_index, seq_len),
      router_z_loss=router_z_loss(router_logits),
      capacity=capacity,
  )


def experts_choose_routing(router_logits: jax.Array, capacity: int, *, score: str = "softmax",
                           scaling_factor: float = 1.0) -> Routing:
  """Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368; flaxformer
  `ExpertsChooseMaskedRouter`): each expert takes the `capacity` tokens of the group with the
  highest scores for it (ties to the lowest token index), so every expert gets exactly C tokens
  and a token gets 0 to E experts. No balancing loss is needed (aux_loss 0); the z-loss stays.

  Expressed in `Routing`'s token-major form with K = E: expert_index[g, t, e] = e, kept where
  expert e took token t, position its rank among e's tokens, combine weight its score (times
  scaling_factor). It is not causal: a token's experts depend on later tokens of its group.

  Args:
    router_logits: float32[G, T, E].
    capacity: C tokens per expert and group (<= T).
  """
  router_logits = router_logits.astype(jnp.float32)
  g, t, e = router_logits.shape
  capacity = min(capacity, t)
  scores = routers.score(router_logits, score)
  _, picked = routers.top_k(jnp.swapaxes(scores, 1, 2), capacity)      # [G, E, C] tokens
  rank = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), picked.shape)
  # [G, E, T]: rank of each token in each expert's pick (C where not picked)
  position = jax.vmap(jax.vmap(lambda tok, r: jnp.full((t,), capacity, jnp.int32).at[tok].set(r)))(
      picked, rank)
  position = jnp.swapaxes(position, 1, 2)                              # [G, T, E]
  kept = position < capacity
  probs = scores if score != "sigmoid" else scores / jnp.sum(scores, axis=-1, keepdims=True)
  return Routing(
      expert_index=jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, t, e)),
      position=position,
      kept=kept,
      combine_weights=jnp.where(kept, scores * scaling_factor, 0.0),
      router_probs=probs,
      aux_loss=jnp.zeros((), jnp.float32),
      router_z_loss=router_z_loss(router_logits),
      capacity=capacity,
  )
