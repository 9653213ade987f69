"""Routing measurements behind the OpenMoE paper's findings (paper §4, App. E-F), as streaming counters.

A `RoutingCounters` per (checkpoint, task, MoE layer) absorbs router decisions batch by batch;
its memory is fixed by the vocabulary, the sequence length and the expert count, never by the
number of tokens seen. The measurement functions below turn counters into numbers:

  * `load_cv`: load-balance coefficient of variation of the expert load.
  * `specialisation`: how concentrated each token ID's (or position ID's) top-1 routing is,
    next to the value uniform random routing would give with the same occurrence counts.
  * `drop_fraction_by_bin`: dropped assignments by position bin (drop-towards-the-end).
  * `top1_agreement`: share of token IDs whose top-1 expert agrees between two checkpoints.

Expert-choice routing (ROUTER='experts_choose': each expert takes its top-C tokens of the group,
so a token gets 0..E experts) has no per-token top-k; its counters (`expert_choice=True`) are
fed by `add_expert_choices` and `add_expert_choice_drops` with these definitions:
  * load: picks per expert (uniform by construction at a fixed capacity, up to padding tokens
    taking picks);
  * a token's top-1 expert: the expert with the highest combine weight among those that took it;
    tokens no expert took are left out of specialisation and agreement, and counted
    (`tokens_not_taken`);
  * drops: real tokens no expert took (`dropped`/`assigned` count tokens, not assignments), and
    apart, tokens their preferred expert (the highest router score) did not take (`dropped_first`).

Legend: B batch, L length, K experts per token, E experts, V vocabulary.
"""
from typing import Dict, Optional, Sequence

import numpy as np


class RoutingCounters:
  """Routing statistics of one MoE layer on one task at one checkpoint.

  Attributes:
    expert_choice: the layer routes by expert choice (module docstring): the counters below
      then count as noted in brackets.
    load: int64[E] assignments (all K choices) of real tokens per expert [picks of real tokens].
    token_top1: int64[V, E] top-1 choices per input token ID [of the tokens some expert took].
    position_top1: int64[L, E] top-1 choices per position ID [likewise].
    tokens_not_taken: int, real tokens no expert took at the routing capacity factor (expert
      choice only; 0 under token choice).
    dropped: dict capacity factor -> int64[bins] dropped assignments per position bin [real
      tokens no expert took].
    assigned: dict capacity factor -> int64[bins] assignments per position bin [real tokens].
    dropped_first: dict capacity factor -> int64[bins] dropped first choices per position bin
      [real tokens their preferred expert did not take].
    tokens_by_bin: dict capacity factor -> int64[bins] real tokens per position bin.
    experts_per_token: dict capacity factor -> int64[E + 1] real tokens taken by 0..E experts
      [expert choice only].
  """

  def __init__(self, vocab_size: int, num_experts: int, max_length: int, position_bins: int,
               expert_choice: bool = False):
    self.vocab_size = vocab_size
    self.num_experts = num_experts
    self.max_length = max_length
    self.position_bins = position_bins
    self.expert_choice = expert_choice
    self.num_tokens = 0
    self.tokens_not_taken = 0
    self.load = np.zeros(num_experts, np.int64)
    self.token_top1 = np.zeros((vocab_size, num_experts), np.int64)
    self.position_top1 = np.zeros((max_length, num_experts), np.int64)
    self.dropped: Dict[float, np.ndarray] = {}
    self.assigned: Dict[float, np.ndarray] = {}
    self.dropped_first: Dict[float, np.ndarray] = {}
    self.tokens_by_bin: Dict[float, np.ndarray] = {}
    self.experts_per_token: Dict[float, np.ndarray] = {}

  def _bincount2(self, rows, experts, num_rows):
    flat = rows.astype(np.int64) * self.num_experts + experts.astype(np.int64)
    return np.bincount(flat, minlength=num_rows * self.num_experts).reshape(num_rows, -1)

  def add_choices(self, token_ids, position_ids, expert_index, real) -> None:
    """Adds the expert choices of one batch.

    Args:
      token_ids: int[B, L] input token at each position (what the router sees).
      position_ids: int[B, L] position ID of each token (packed sequences restart at 0).
      expert_index: int[B, L, K] chosen experts, best first.
      real: bool[B, L] real (non-padding) tokens; the rest are ignored.
    """
    assert not self.expert_choice, "expert-choice counters take add_expert_choices"
    real = np.asarray(real, bool)
    expert_index = np.asarray(expert_index)
    self.num_tokens += int(real.sum())
    self.load += np.bincount(expert_index[real].reshape(-1), minlength=self.num_experts)
    top1 = expert_index[..., 0][real]
    self.token_top1 += self._bincount2(np.asarray(token_ids)[real], top1, self.vocab_size)
    positions = np.minimum(np.asarray(position_ids)[real], self.max_length - 1)
    self.position_top1 += self._bincount2(positions, top1, self.max_length)

  def add_drops(self, capacity_factor: float, kept, real) -> None:
    """Adds which assignments of one batch fit in the capacity at `capacity_factor`.

    Bins are over the index in the row (0..L-1): left-to-right priority acts on that order,
    whatever the packed sequences inside the row.

    Args:
      capacity_factor: the capacity factor the routing used (the dict key).
      kept: bool[B, L, K] assignment fits in its expert's capacity.
      real: bool[B, L] real tokens.
    """
    assert not self.expert_choice, "expert-choice counters take add_expert_choice_drops"
    kept = np.asarray(kept, bool)
    real = np.asarray(real, bool)
    length = kept.shape[1]
    bins = (np.arange(length) * self.position_bins) // length
    real_k = np.broadcast_to(real[..., None], kept.shape)
    per_pos_total = real_k.sum(axis=(0, 2))
    per_pos_dropped = (real_k & ~kept).sum(axis=(0, 2))
    zeros = lambda: np.zeros(self.position_bins, np.int64)
    self.assigned.setdefault(capacity_factor, zeros())
    self.dropped.setdefault(capacity_factor, zeros())
    self.assigned[capacity_factor] += np.bincount(bins, per_pos_total, self.position_bins).astype(
        np.int64)
    self.dropped[capacity_factor] += np.bincount(bins, per_pos_dropped, self.position_bins).astype(
        np.int64)
    # First choices apart: with the flaxformer capacity (no factor k) second choices are dropped
    # even under perfect balance, which would hide where the tokens' best experts overflow.
    first = (real & ~kept[..., 0]).sum(axis=0)
    self.dropped_first.setdefault(capacity_factor, zeros())
    self.dropped_first[capacity_factor] += np.bincount(bins, first, self.position_bins).astype(
        np.int64)
    self.tokens_by_bin.setdefault(capacity_factor, zeros())
    self.tokens_by_bin[capacity_factor] += np.bincount(bins, real.sum(axis=0),
                                                       self.position_bins).astype(np.int64)

  def _bins(self, per_position) -> np.ndarray:
    length = len(per_position)
    bins = (np.arange(length) * self.position_bins) // length
    return np.bincount(bins, per_position, self.position_bins).astype(np.int64)

  def add_expert_choices(self, token_ids, position_ids, kept, top1, real) -> None:
    """Adds the expert-choice routing of one batch (module docstring).

    Args:
      token_ids: int[B, L] input token at each position.
      position_ids: int[B, L] position ID of each token.
      kept: bool[B, L, E] expert e took the token.
      top1: int[B, L] the token's top-1 expert: the one with the highest combine weight among
        those that took it; -1 where no expert took it.
      real: bool[B, L] real tokens; the rest are ignored.
    """
    assert self.expert_choice, "token-choice counters take add_choices"
    real = np.asarray(real, bool)
    kept = np.asarray(kept, bool)
    top1 = np.asarray(top1)
    self.num_tokens += int(real.sum())
    self.load += kept[real].sum(axis=0).astype(np.int64)
    taken = real & (top1 >= 0)
    self.tokens_not_taken += int((real & ~taken).sum())
    self.token_top1 += self._bincount2(np.asarray(token_ids)[taken], top1[taken], self.vocab_size)
    positions = np.minimum(np.asarray(position_ids)[taken], self.max_length - 1)
    self.position_top1 += self._bincount2(positions, top1[taken], self.max_length)

  def add_expert_choice_drops(self, capacity_factor: float, kept, preferred, real) -> None:
    """Adds which real tokens of one batch the experts took at `capacity_factor` (expert choice).

    Bins are over the index in the row, as in `add_drops`. `dropped` counts tokens no expert
    took (over `assigned`, the real tokens), `dropped_first` tokens their preferred expert did
    not take, and `experts_per_token` how many experts took each token.

    Args:
      capacity_factor: the capacity factor the routing used (the dict key).
      kept: bool[B, L, E] expert e took the token.
      preferred: int[B, L] the token's highest-scoring expert (argmax of the router scores).
      real: bool[B, L] real tokens.
    """
    assert self.expert_choice, "token-choice counters take add_drops"
    kept = np.asarray(kept, bool)
    real = np.asarray(real, bool)
    taken_by = kept.sum(axis=-1)
    pref_took = np.take_along_axis(kept, np.asarray(preferred)[..., None], axis=-1)[..., 0]
    zeros = lambda n=self.position_bins: np.zeros(n, np.int64)
    for name, per_position in (("assigned", real), ("tokens_by_bin", real),
                               ("dropped", real & (taken_by == 0)),
                               ("dropped_first", real & ~pref_took)):
      counts = getattr(self, name)
      counts.setdefault(capacity_factor, zeros())
      counts[capacity_factor] += self._bins(per_position.sum(axis=0))
    self.experts_per_token.setdefault(capacity_factor, zeros(self.num_experts + 1))
    self.experts_per_token[capacity_factor] += np.bincount(
        taken_by[real], minlength=self.num_experts + 1).astype(np.int64)


def merge(counters: Sequence[RoutingCounters]) -> RoutingCounters:
  """Sums the choice counters (not the drops) of one layer over tasks."""
  first = counters[0]
  total = RoutingCounters(first.vocab_size, first.num_experts, first.max_length,
                          first.position_bins, first.expert_choice)
  for c in counters:
    total.num_tokens += c.num_tokens
    total.tokens_not_taken += c.tokens_not_taken
    total.load += c.load
    total.token_top1 += c.token_top1
    total.position_top1 += c.position_top1
  return total


def load_share(load: np.ndarray) -> np.ndarray:
  """Expert load as shares summing to 1 (zeros when nothing was routed)."""
  total = load.sum()
  return load / total if total else np.zeros(len(load))


def load_cv(load: np.ndarray) -> float:
  """Coefficient of variation std/mean of the per-expert load (0 = perfectly balanced)."""
  load = np.asarray(load, np.float64)
  return float(load.std() / load.mean()) if load.mean() > 0 else 0.0


def _row_stats(counts: np.ndarray):
  """Per row of counts[N, E]: top-1 share and std of the routing distribution across experts."""
  totals = counts.sum(axis=1, keepdims=True)
  dist = counts / np.maximum(totals, 1)
  return dist.max(axis=1), dist.std(axis=1)


def specialisation(counts: np.ndarray, min_count: int = 128, baseline_draws: int = 32,
                   seed: int = 0) -> dict:
  """How concentrated routing is for the rows (token IDs or position IDs) of `counts`.

  Only rows with at least `min_count` occurrences count (the paper: token IDs with > 128).
  The baseline is the expectation under uniform random routing with the same per-row counts,
  estimated by simulation: with few occurrences even uniform routing looks concentrated, so
  the baseline, not 1/E, is the fair reference.

  Args:
    counts: int[N, E] top-1 choices per row.
    min_count: occurrence threshold.
    baseline_draws: multinomial draws per row for the baseline.
    seed: random seed of the baseline (results are deterministic).

  Returns:
    dict with num_ids (rows kept), num_occurrences, top1_share (occurrence-weighted mean of each
    row's share sent to its most frequent expert), routing_std (mean over rows of the std of the
    row's routing distribution across experts), and their uniform_* baselines; None values when
    no row has enough occurrences.
  """
  counts = np.asarray(counts, np.int64)
  totals = counts.sum(axis=1)
  rows = counts[totals >= min_count]
  n = rows.sum(axis=1)
  out = {"num_ids": int(len(rows)), "num_occurrences": int(n.sum()), "min_count": min_count}
  if not len(rows):
    return dict(out, top1_share=None, routing_std=None, uniform_top1_share=None,
                uniform_routing_std=None)
  share, std = _row_stats(rows)
  rng = np.random.default_rng(seed)
  num_experts = counts.shape[1]
  sims = rng.multinomial(np.repeat(n, baseline_draws), np.full(num_experts, 1.0 / num_experts))
  sim_share, sim_std = _row_stats(sims)
  w = np.repeat(n, baseline_draws)
  return dict(out,
              top1_share=float(np.average(share, weights=n)),
              routing_std=float(std.mean()),
              uniform_top1_share=float(np.average(sim_share, weights=w)),
              uniform_routing_std=float(sim_std.mean()))


def top_tokens_per_expert(counts: np.ndarray, num: int = 10, min_count: int = 1,
                          decode=None) -> list:
  """The token IDs sent (top-1) most often to each expert.

  Args:
    counts: int[V, E] top-1 choices per token ID.
    num: tokens per expert.
    min_count: ignore token IDs with fewer occurrences.
    decode: optional id -> str.

  Returns:
    list over experts of [{"id", "token", "count", "share"}] where share is the fraction of
    that token ID's occurrences the expert received.
  """
  counts = np.asarray(counts)
  totals = counts.sum(axis=1)
  result = []
  for e in range(counts.shape[1]):
    col = np.where(totals >= min_count, counts[:, e], 0)
    ids = [i for i in np.argsort(-col, kind="stable")[:num] if col[i] > 0]
    result.append([{"id": int(i), "token": decode(int(i)) if decode else None,
                    "count": int(col[i]), "share": float(col[i] / totals[i])} for i in ids])
  return result


def drop_fraction_by_bin(dropped: np.ndarray, assigned: np.ndarray) -> list:
  """Dropped / assigned per position bin (None for empty bins)."""
  return [float(d / a) if a else None for d, a in zip(dropped, assigned)]


def top1_agreement(counts_a: np.ndarray, counts_b: np.ndarray, min_count: int = 1) -> dict:
  """Agreement of each token ID's most frequent top-1 expert between two checkpoints.

  Args:
    counts_a, counts_b: int[V, E] top-1 choices per token ID at two checkpoints, on the same data.
    min_count: only token IDs with at least this many occurrences in both.

  Returns:
    dict with num_ids, agreement (share of token IDs whose most frequent expert is the same)
    and weighted_agreement (the same, weighted by occurrences); None without token IDs.
  """
  counts_a, counts_b = np.asarray(counts_a), np.asarray(counts_b)
  n_a, n_b = counts_a.sum(axis=1), counts_b.sum(axis=1)
  ids = (n_a >= min_count) & (n_b >= min_count)
  if not ids.any():
    return {"num_ids": 0, "agreement": None, "weighted_agreement": None}
  same = counts_a[ids].argmax(axis=1) == counts_b[ids].argmax(axis=1)
  return {"num_ids": int(ids.sum()), "agreement": float(same.mean()),
          "weighted_agreement": float(np.average(same, weights=n_b[ids]))}


def _drops(counters: RoutingCounters, cf: float) -> dict:
  dropped, assigned, first = counters.dropped[cf], counters.assigned[cf], counters.dropped_first[cf]
  tokens = counters.tokens_by_bin[cf]
  out = {"dropped_fraction": float(dropped.sum() / max(assigned.sum(), 1)),
         "by_position_bin": drop_fraction_by_bin(dropped, assigned),
         "first_choice_dropped_fraction": float(first.sum() / max(tokens.sum(), 1)),
         "first_choice_by_position_bin": drop_fraction_by_bin(first, tokens)}
  if counters.expert_choice:
    hist = counters.experts_per_token[cf]
    out["experts_per_token"] = load_share(hist).tolist()
    out["mean_experts_per_token"] = float(hist @ np.arange(len(hist)) / max(hist.sum(), 1))
  return out


def summarise(counters: RoutingCounters, min_count: int, decode=None,
              top_tokens: Optional[int] = 10) -> dict:
  """All per-(checkpoint, task, layer) measurements of one `RoutingCounters` as JSON.

  Expert-choice counters add num_tokens_not_taken (real tokens left out of the top-1
  measurements), and per capacity factor under drops, experts_per_token (shares of real tokens
  taken by 0..E experts) and mean_experts_per_token; the other keys keep their names with the
  expert-choice meanings of the module docstring.
  """
  out = {
      "num_tokens": counters.num_tokens,
      "expert_load": load_share(counters.load).tolist(),
      "expert_load_cv": load_cv(counters.load),
      "token_id_specialisation": specialisation(counters.token_top1, min_count),
      "position_id_specialisation": specialisation(counters.position_top1, min_count),
      "drops": {str(cf): _drops(counters, cf) for cf in sorted(counters.dropped)},
  }
  if counters.expert_choice:
    out["num_tokens_not_taken"] = counters.tokens_not_taken
  if top_tokens:
    out["top_tokens_per_expert"] = top_tokens_per_expert(counters.token_top1, top_tokens,
                                                         min_count, decode)
  return out
