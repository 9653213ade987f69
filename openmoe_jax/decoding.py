"""Autoregressive decoding with a KV cache: prefill, then one token per step (t5x `decoding.py`).

`generate(params, cfg, prompts, ...)` is a pure function of its arguments. Prompts (token ids,
BOS = 0 added) are left-padded into a [B, P] batch, so every row's next token is read from the
last column, while each row's positions still count from its own BOS (`DecodeCache.start`). The
cache is preallocated as [B, P + N, heads, head_dim] per layer, with P and N rounded up to powers
of two: one compilation per (batch, P, N) bucket, none per prompt length. Under a mesh the cache
is sharded over `batch` and `heads` by the training rules (partitioning.py).

Sampling (t5x `temperature_sample`): temperature 0 is greedy; otherwise logits / temperature,
then top-k, then top-p (nucleus), then a categorical draw with an explicit key folded with the
step. A row stops at EOS, at a stop sequence of token ids, or after max_new_tokens. Reported log
probabilities are the model's own (log_softmax of the raw logits), whatever the sampling.

MoE routing at decode time: each call routes the tokens it holds, as flaxformer's MoE layer does
for any call, with the eval capacity factor: prefill the B x P prompt tokens, a decoding step the
B new tokens, zero-padded to a multiple of E tokens (flaxformer `_maybe_pad`) and split into
flaxformer groups. Capacity routing is not causal (a token's experts depend on the other tokens
of its group), so cached decoding equals re-running the full prefix only without drops:
`ModelConfig.no_drop` or capacity_mode 'dropless' (`--no_drop` of openmoe-infer).

Legend: B batch, P prompt bucket, N new-token bucket, S = P + N cache length, V vocab.
"""
import contextlib
import dataclasses
import functools
from typing import List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax import partitioning as part
from openmoe_jax.config import ModelConfig
from openmoe_jax.model import DecodeCache, Transformer

MIN_BUCKET = 8
# openmoe_jax.vocab's ids, not imported from there: it pulls in seqio and TensorFlow.
BOS_ID = PAD_ID = 0
EOS_ID = 1


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


def init_cache(cfg: ModelConfig, batch: int, length: int, start) -> DecodeCache:
  """Zero cache of `length` columns; start: int32[B] first real column of each row."""
  shape = (batch, length, cfg.num_heads, cfg.head_dim)
  zeros = lambda: part.constrain(jnp.zeros(shape, cfg.dtype),
                                 (part.BATCH, part.LENGTH, part.HEADS, part.KV))
  return DecodeCache(keys=tuple(zeros() for _ in range(cfg.num_layers)),
                     values=tuple(zeros() for _ in range(cfg.num_layers)),
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
    hit = jnp.all((window[:, None, :] == stops[None]) | ~stop_valid[None], axis=-1)
    hit = jnp.any(hit & jnp.any(stop_valid, axis=-1)[None], axis=-1)
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
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompts = [([BOS_ID] if add_bos else []) + list(p) for p in prompts]
  if not prompts:
    return []
  if any(not p for p in prompts):
    raise ValueError("empty prompt (pass add_bos=True or a BOS id)")
  rng = jax.random.key(0) if rng is None else rng
  rows = batch_size or len(prompts)
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["expert"]
    rows = -(-rows // shards) * shards
  plen, num_new = bucket(max(len(p) for p in prompts)), bucket(max_new_tokens)
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


def _trim(ids, logp, stopped: bool, eos_id: int, stop_sequences) -> Generation:
  ids, logp = [int(x) for x in ids], [float(x) for x in logp]
  if ids and ids[-1] == eos_id:
    return Generation(ids[:-1], logp[:-1], "eos")
  if stopped:
    cut = max(len(s) for s in stop_sequences if len(s) and ids[len(ids) - len(s):] == list(s))
    return Generation(ids[:-cut], logp[:-cut], "stop")
  return Generation(ids, logp, "length")


def _mesh_context(mesh) -> contextlib.ExitStack:
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(part.axis_rules()))
  return stack


def place_params(params, cfg: ModelConfig, mesh=None):
  """Params as device arrays: on the mesh with the training shardings, else on the default
  device (so repeated calls do not copy host arrays again)."""
  if mesh is None:
    return jax.device_put(params)
  tokens = jax.ShapeDtypeStruct((1, max(cfg.num_experts, 1) * cfg.num_expert_replicas), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)["params"]
  return jax.device_put(params, part.mesh_shardings(boxed, mesh))
