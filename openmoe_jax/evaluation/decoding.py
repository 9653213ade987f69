"""Autoregressive decoding with a KV cache: prefill, then one token per step (t5x `decoding.py`).

`generate(params, cfg, prompts, ...)` is a pure function of its arguments. Prompts (token ids,
BOS = 0 added) are left-padded into a [B, P] batch, so every row's next token is read from the
last column, while each row's positions still count from its own BOS (`DecodeCache.start`). The
cache is preallocated as [B, P + N, key/value heads, head_dim] per layer (multi-head latent
attention: its latent and rotary key, `transformer.cache_layout`), with P and N rounded up to
powers of two: one compilation per (batch, P, N) bucket, none per prompt length. Under a mesh the cache
is sharded over `batch` and `heads` by the training rules (partitioning.py).

Sampling (t5x `temperature_sample`): temperature 0 is greedy; otherwise logits / temperature,
then top-k, then top-p (nucleus), then a categorical draw with an explicit key folded with the
step. A row stops at EOS, at a stop sequence of token ids, or after max_new_tokens. Reported log
probabilities are the model's own (log_softmax of the raw logits), whatever the sampling.

Beam search (t5x `beam_search`): `beam_search(...)` keeps K live beams per prompt. After the
prefill the cache rows are repeated to B * K; each step scores the K * V one-token extensions,
takes the best 2K, moves those that end (EOS, stop sequence, last step) into the K best finished
beams by log_prob / ((5 + length) / 6) ** alpha, keeps the K best others live, and gathers the
cache rows of their parent beams. A prompt stops when no live beam can beat its worst finished one.

MoE routing at decode time: each call routes the tokens it holds, as flaxformer's MoE layer does
for any call, with the eval capacity factor: prefill the B x P prompt tokens, a decoding step the
B new tokens, zero-padded to a multiple of E tokens (flaxformer `_maybe_pad`) and split into
flaxformer groups. Capacity routing is not causal (a token's experts depend on the other tokens
of its group), so cached decoding equals re-running the full prefix only without drops:
`ModelConfig.no_drop` or capacity_mode 'dropless' (`--no_drop` of openmoe-infer).

Legend: B batch, P prompt bucket, N new-token bucket, S = P + N cache length, V vocab, K beams.
"""
import contextlib
import dataclasses
import functools
from typing import List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.errors import UsageError
from openmoe_jax.model import partitioning as part
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import DecodeCache, Transformer, cache_layout

MIN_BUCKET = 8
from openmoe_jax.data.special_tokens import BOS_ID, EOS_ID, PAD_ID  # noqa: F401  re-exported


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (top_k, top_p ignored); top_k 0 and top_p 1.0 switch those off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
  ids: List[int]            # generated tokens, without the EOS / stop sequence that ended them
  log_probs: List[float]    # ln p(ids[i] | prompt, ids[:i]) under the model
  finish: str               # 'eos', 'stop' or 'length'


class BeamGeneration(NamedTuple):
  ids: List[int]            # as Generation
  log_probs: List[float]
  finish: str
  log_prob: float           # sum of ln p of every generated token, the ending EOS / stop included
  score: float              # what the search ranks: log_prob / brevity_penalty(alpha, #tokens)


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """n rounded up to a power of two (at least `minimum`)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def filter_logits(logits, sampling: Sampling):
  """float32[B, V] -> logits / temperature with everything outside top-k / top-p at -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = before < sampling.top_p               # the first token is always kept
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits, rng, sampling: Sampling):
  """float32[B, V] -> int32[B] next tokens."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def brevity_penalty(alpha, length):
  """t5x / flaxformer's length normalisation: ((5 + length) / 6) ** alpha (1 for alpha 0)."""
  return ((5.0 + length) / 6.0) ** alpha


def _stop_hit(window, stops, stop_valid):
  """int32[..., W] each row's last W tokens -> bool[...]: they end with a stop sequence.
  stops: int32[n, W] right-aligned, stop_valid: bool[n, W] (an all-invalid row matches nothing)."""
  lead = (1,) * (window.ndim - 1)
  stops, valid = stops.reshape(lead + stops.shape), stop_valid.reshape(lead + stop_valid.shape)
  match = jnp.all((window[..., None, :] == stops) | ~valid, axis=-1)
  return jnp.any(match & jnp.any(valid, axis=-1), axis=-1)


def init_cache(cfg: ModelConfig, batch: int, length: int, start) -> DecodeCache:
  """Zero cache of `length` columns; start: int32[B] first real column of each row."""
  key, value, axes = cache_layout(cfg)
  zeros = lambda dims: part.constrain(jnp.zeros((batch, length, *dims), cfg.dtype), axes)
  return DecodeCache(keys=tuple(zeros(key) for _ in range(cfg.num_layers)),
                     values=tuple(zeros(value) for _ in range(cfg.num_layers)),
                     index=jnp.zeros((), jnp.int32), start=jnp.asarray(start, jnp.int32))


def prefill(params, cfg: ModelConfig, tokens, start, num_new: int):
  """Runs the left-padded prompts int32[B, P] into a fresh cache of P + num_new columns.

  Returns (float32[B, V] next-token logits of every row, the cache with index P).
  """
  b, plen = tokens.shape
  cache = init_cache(cfg, b, plen + num_new, start)
  logits, _, cache = Transformer(cfg).apply({"params": params}, tokens, cache=cache)
  return logits[:, -1], cache


def _decode(params, tokens, start, rng, max_new, stops, stop_valid, *, cfg, sampling, num_new,
            eos_id):
  """The jitted body: prefill, then a while loop of single-token steps."""
  b = tokens.shape[0]
  model = Transformer(cfg)
  last, cache = prefill(params, cfg, tokens, start, num_new)
  window = jnp.full((b, stops.shape[1]), -1, jnp.int32)

  def step_fn(state):
    step, cache, last, out, logp, done, length, stopped, window = state
    tok = sample(last, jax.random.fold_in(rng, step), sampling)
    tok = jnp.where(done, PAD_ID, tok)
    lp = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tok[:, None], axis=-1)[:, 0]
    out = out.at[:, step].set(tok)
    logp = logp.at[:, step].set(lp)
    window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
    hit = _stop_hit(window, stops, stop_valid)
    length = jnp.where(done, length, step + 1)
    stopped = stopped | (~done & hit)
    done = done | (tok == eos_id) | hit | (step + 1 >= max_new)
    logits, _, cache = model.apply({"params": params}, tok[:, None], cache=cache)
    return step + 1, cache, logits[:, 0], out, logp, done, length, stopped, window

  def cond_fn(state):
    step, done = state[0], state[5]
    return (step < max_new) & ~jnp.all(done)

  state = (jnp.zeros((), jnp.int32), cache, last, jnp.zeros((b, num_new), jnp.int32),
           jnp.zeros((b, num_new), jnp.float32), jnp.zeros((b,), bool),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), window)
  state = jax.lax.while_loop(cond_fn, step_fn, state)
  out, logp, length, stopped = state[3], state[4], state[6], state[7]
  return out, logp, length, stopped


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, sampling: Sampling, num_new: int, eos_id: int, mesh=None):
  del mesh  # a key only: a trace under a mesh carries its sharding constraints
  return jax.jit(functools.partial(_decode, cfg=cfg, sampling=sampling, num_new=num_new,
                                   eos_id=eos_id))


def _stop_arrays(stop_sequences: Sequence[Sequence[int]]):
  """Right-aligned [n, K] ids and validity mask (one all-invalid row when there are none)."""
  seqs = [list(s) for s in stop_sequences if len(s)]
  width = max([len(s) for s in seqs] + [1])
  ids = np.full((max(len(seqs), 1), width), -1, np.int32)
  valid = np.zeros(ids.shape, bool)
  for i, s in enumerate(seqs):
    ids[i, width - len(s):] = s
    valid[i, width - len(s):] = True
  return ids, valid


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int):
  """int32[rows, length] left-padded prompts and int32[rows] start columns (extra rows: BOS)."""
  tokens = np.zeros((rows, length), np.int32)
  start = np.full((rows,), length - 1, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    start[i] = length - len(p)
  return tokens, start


def check_causal(cfg: ModelConfig) -> None:
  """UsageError for a model that cannot decode token by token: expert-choice routing lets an
  expert pick a token by the tokens after it."""
  if cfg.router == "experts_choose":
    raise UsageError("expert-choice routing (ROUTER='experts_choose') is not causal: an expert "
                     "chooses a token by comparing it with the later tokens of its group, so the "
                     "model cannot decode; score or evaluate its loss instead")


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(), rng=None,
             eos_id: int = EOS_ID, stop_sequences: Sequence[Sequence[int]] = (),
             add_bos: bool = True, batch_size: Optional[int] = None,
             mesh: Optional[jax.sharding.Mesh] = None) -> List[Generation]:
  """Continues every prompt; returns one Generation per prompt, in order.

  Args:
    params: the model's parameters (host arrays or jax.Arrays).
    cfg: its ModelConfig (routing settings included: see the module docstring).
    prompts: token ids, without BOS when add_bos (the decoder reads [BOS] + prompt).
    max_new_tokens: at most this many tokens per prompt (the stopping EOS included).
    sampling: temperature / top-k / top-p.
    rng: a jax.random key (default key 0); only sampling uses it.
    eos_id: stops a row (not part of Generation.ids).
    stop_sequences: token-id sequences that also stop a row (removed from Generation.ids).
    batch_size: rows per compiled batch (default: all prompts in one); the last batch is padded
      to it, so one compilation serves every batch.
    mesh: run sharded on this (data, expert, model) mesh with the training axis rules.
  """
  check_causal(cfg)
  prompts, rows, plen, num_new = _batching(prompts, max_new_tokens, add_bos, batch_size, mesh)
  if not prompts:
    return []
  rng = jax.random.key(0) if rng is None else rng
  stops, stop_valid = _stop_arrays(stop_sequences)
  fn = _compiled(cfg, sampling, num_new, eos_id, mesh)
  results = []
  with _mesh_context(mesh):
    params = place_params(params, cfg, mesh)
    for first in range(0, len(prompts), rows):
      chunk = prompts[first:first + rows]
      tokens, start = left_pad(chunk, plen, rows)
      out, logp, length, stopped = jax.device_get(fn(
          params, tokens, start, jax.random.fold_in(rng, first), jnp.int32(max_new_tokens),
          stops, stop_valid))
      for i in range(len(chunk)):
        results.append(_trim(out[i, :length[i]], logp[i, :length[i]], bool(stopped[i]),
                             eos_id, stop_sequences))
  return results


def _batching(prompts, max_new_tokens: int, add_bos: bool, batch_size, mesh):
  """Checked prompts ([BOS] + ids), rows per compiled batch (a multiple of the mesh's batch
  shards), the prompt bucket P and the new-token bucket N."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompts = [([BOS_ID] if add_bos else []) + list(p) for p in prompts]
  if any(not p for p in prompts):
    raise ValueError("empty prompt (pass add_bos=True or a BOS id)")
  rows = batch_size or max(len(prompts), 1)
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["expert"]
    rows = -(-rows // shards) * shards
  plen = bucket(max(len(p) for p in prompts)) if prompts else 0
  return prompts, rows, plen, bucket(max_new_tokens)


def _trim(ids, logp, stopped: bool, eos_id: int, stop_sequences) -> Generation:
  ids, logp = [int(x) for x in ids], [float(x) for x in logp]
  if ids and ids[-1] == eos_id:
    return Generation(ids[:-1], logp[:-1], "eos")
  if stopped:
    cut = max(len(s) for s in stop_sequences if len(s) and ids[len(ids) - len(s):] == list(s))
    return Generation(ids[:-cut], logp[:-cut], "stop")
  return Generation(ids, logp, "length")


class _Beams(NamedTuple):
  """M beams of each of B rows: K live or finished ones, 2K candidates, 3K being merged."""
  seqs: jax.Array       # int32[B, M, N] generated tokens
  logps: jax.Array      # float32[B, M, N] their log-probs
  log_prob: jax.Array   # float32[B, M] sum of logps; -inf: an empty slot
  score: jax.Array      # float32[B, M] log_prob / brevity_penalty(length) when finished, else -inf
  length: jax.Array     # int32[B, M] generated tokens
  stopped: jax.Array    # bool[B, M] ended by a stop sequence
  window: jax.Array     # int32[B, M, W] the last W tokens (stop sequences)


def _take(tree, idx):
  """Every leaf [B, M, ...] -> [B, K, ...]: the beams at int32[B, K] indices into M."""
  rows = jnp.arange(idx.shape[0])[:, None]
  return jax.tree.map(lambda x: x[rows, idx], tree)


def _beam_decode(params, tokens, start, max_new, alpha, stops, stop_valid, *, cfg, num_beams,
                 num_new, eos_id):
  """The jitted body of beam_search: prefill, the cache rows repeated to B * K, then a while loop
  that extends the live beams by one token. Returns the finished _Beams [B, K], best first."""
  b, k = tokens.shape[0], num_beams
  model = Transformer(cfg)
  last, cache = prefill(params, cfg, tokens, start, num_new)
  kv = lambda x: part.constrain(x, cache_layout(cfg)[2])
  rep = lambda x: jnp.repeat(x, k, axis=0)  # row r -> rows r * K .. r * K + K - 1
  cache = cache.replace(keys=tuple(kv(rep(x)) for x in cache.keys),
                        values=tuple(kv(rep(x)) for x in cache.values), start=rep(cache.start))
  ninf = jnp.full((b, k), -jnp.inf, jnp.float32)
  empty = _Beams(jnp.zeros((b, k, num_new), jnp.int32), jnp.zeros((b, k, num_new), jnp.float32),
                 ninf, ninf, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool),
                 jnp.full((b, k, stops.shape[1]), -1, jnp.int32))
  live = empty._replace(log_prob=ninf.at[:, 0].set(0.0))  # one live beam: the prompt itself

  def step_fn(state):
    step, cache, logits, live, finished, done = state
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, v)
    total, idx = jax.lax.top_k((live.log_prob[:, :, None] + logp).reshape(b, k * v), 2 * k)
    parent, tok = idx // v, idx % v  # [B, 2K] candidates
    cand = _take(live, parent)
    window = jnp.concatenate([cand.window[:, :, 1:], tok[:, :, None]], axis=2)
    stopped = _stop_hit(window, stops, stop_valid)
    ended = (tok == eos_id) | stopped | (step + 1 >= max_new)
    cand = _Beams(cand.seqs.at[:, :, step].set(tok),
                  cand.logps.at[:, :, step].set(logp[jnp.arange(b)[:, None], parent, tok]),
                  total, jnp.where(ended, total / brevity_penalty(alpha, step + 1), -jnp.inf),
                  jnp.full_like(tok, step + 1), stopped, window)
    # The K best candidates go on; the ended ones compete with the K best finished so far.
    going_on = jnp.where(ended, -jnp.inf, total)  # -inf: an ended beam never comes back to life
    keep = jax.lax.top_k(going_on, k)[1]
    live = _take(cand._replace(log_prob=going_on), keep)
    merged = jax.tree.map(lambda f, c: jnp.concatenate([f, c], axis=1), finished, cand)
    merged = _take(merged, jax.lax.top_k(merged.score, k)[1])
    frozen = lambda f, m: jnp.where(done.reshape((b,) + (1,) * (f.ndim - 1)), f, m)
    finished = jax.tree.map(frozen, finished, merged)
    # Each live beam carries on from its parent's cache rows.
    rows = (jnp.arange(b)[:, None] * k + _take(parent, keep)).reshape(b * k)
    cache = cache.replace(keys=tuple(kv(x[rows]) for x in cache.keys),
                          values=tuple(kv(x[rows]) for x in cache.values))
    logits, _, cache = model.apply({"params": params}, live.seqs[:, :, step].reshape(b * k, 1),
                                   cache=cache)
    # A row is done when no live beam, even at its most favoured length, beats its worst finished.
    best = live.log_prob[:, 0] / jnp.maximum(brevity_penalty(alpha, step + 2),
                                             brevity_penalty(alpha, max_new))
    done = (done | (finished.score[:, -1] > best) | (live.log_prob[:, 0] == -jnp.inf)
            | (step + 1 >= max_new))
    return step + 1, cache, logits[:, 0], live, finished, done

  def cond_fn(state):
    step, done = state[0], state[-1]
    return (step < max_new) & ~jnp.all(done)

  state = (jnp.zeros((), jnp.int32), cache, rep(last), live, empty, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond_fn, step_fn, state)[4]


@functools.lru_cache(maxsize=32)
def _compiled_beam(cfg: ModelConfig, num_beams: int, num_new: int, eos_id: int, mesh=None):
  del mesh  # a key only, as in _compiled
  return jax.jit(functools.partial(_beam_decode, cfg=cfg, num_beams=num_beams, num_new=num_new,
                                   eos_id=eos_id))


def beam_search(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                max_new_tokens: int, num_beams: int = 4, alpha: float = 0.6,
                eos_id: int = EOS_ID, stop_sequences: Sequence[Sequence[int]] = (),
                add_bos: bool = True, batch_size: Optional[int] = None,
                mesh: Optional[jax.sharding.Mesh] = None, all_beams: bool = False) -> list:
  """Beam search continuations of every prompt (t5x `decoding.beam_search`), in order.

  Returns one BeamGeneration per prompt, the best; with all_beams, a list per prompt of its
  finished beams (at most num_beams), best first. Arguments as generate's, and:
    num_beams: K, live beams per prompt; the cache and every step hold B * K rows. K = 1 without
      EOS or stop sequences is greedy decoding; with them it is not quite: an ending candidate is
      kept as a finished beam while the best other token goes on, and the best finished beam wins.
    alpha: beams are ranked by log_prob / ((5 + length) / 6) ** alpha, with length the number of
      generated tokens, the ending EOS / stop sequence included; 0 ranks by log_prob alone
      (favouring short completions), larger values favour longer ones. Beams still live after
      max_new_tokens are finished there ('length').
  """
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if not np.isfinite(alpha):
    raise ValueError(f"alpha must be finite, got {alpha}")
  check_causal(cfg)
  prompts, rows, plen, num_new = _batching(prompts, max_new_tokens, add_bos, batch_size, mesh)
  stops, stop_valid = _stop_arrays(stop_sequences)
  fn = _compiled_beam(cfg, num_beams, num_new, eos_id, mesh)
  results = []
  with _mesh_context(mesh):
    params = place_params(params, cfg, mesh) if prompts else params
    for first in range(0, len(prompts), rows):
      chunk = prompts[first:first + rows]
      tokens, start = left_pad(chunk, plen, rows)
      beams = jax.device_get(fn(params, tokens, start, jnp.int32(max_new_tokens),
                                jnp.float32(alpha), stops, stop_valid))
      for i in range(len(chunk)):
        found = [BeamGeneration(*_trim(beams.seqs[i, j, :n], beams.logps[i, j, :n],
                                       bool(beams.stopped[i, j]), eos_id, stop_sequences),
                                float(beams.log_prob[i, j]), float(beams.score[i, j]))
                 for j, n in enumerate(beams.length[i]) if np.isfinite(beams.score[i, j])]
        results.append(found if all_beams else found[0])
  return results


def _mesh_context(mesh) -> contextlib.ExitStack:
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(part.LOGICAL_AXIS_RULES))
  return stack


def place_params(params, cfg: ModelConfig, mesh=None):
  """Params as device arrays: on the mesh with the training shardings, else on the default
  device (so repeated calls do not copy host arrays again)."""
  if mesh is None:
    return jax.device_put(params)
  tokens = jax.ShapeDtypeStruct((1, max(cfg.num_experts, 1) * cfg.num_expert_replicas), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)["params"]
  return jax.device_put(params, part.mesh_shardings(boxed, mesh))
