"""Attention cores behind one binding (`ATTENTION_IMPL`): softmax(q k^T * scale, masked) v.

Legend: B batch, T query length, S key length, N query heads, K key/value heads, H query/key
head dim, Hv value head dim.

    'dense'    the [B, N, T, S] logits, mask and probabilities in the activation dtype
               (flaxformer `dense_attention`, OpenMoE's numerics). Memory ~ T x S.
    'chunked'  blockwise online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al.
               2022, Algorithm 1 and its backward): query blocks x key blocks of
               `attention_block` rows, float32 logits and statistics, a custom VJP that saves
               only the output and the log-sum-exp and recomputes each block's probabilities.
               Any backend; memory ~ T + S. Key blocks no query of the block may see are
               skipped (lax.cond), so causal attention costs about half the dense FLOPs.
    'splash'   Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`,
               MaxText's TPU path), under shard_map over batch and heads; Pallas interpret
               mode on CPU (the tests).
    'cudnn'    cuDNN flash attention through `jax.nn.dot_product_attention(...,
               implementation='cudnn')` (MaxText's GPU path). GPU only.
    'auto'     `resolve`: CPU -> 'dense', or 'chunked' once the dense logits would pass
               DENSE_LOGITS_BUDGET bytes per device; TPU v4 and later -> 'splash' where it
               applies (v2/v3: Mosaic has no bfloat16 matmul), GPU -> 'cudnn' where it
               applies; else as on CPU.

The mask is a spec, never a [T, S] array (`AttentionMask`): query i sees key j iff
kv_cols[j] <= q_cols[i] and q_segment[i] == kv_segment[j]. Training gives every token its
segment id (padding -1 as a query, -2 as a key, so it sees and is seen by nothing), and the
columns are the indices (flaxformer's causal mask is by index, not by position); cached
decoding gives the query columns cache.index..+T and the keys left of a row's start segment -2.

Semantics shared with 'dense', exactly where the arithmetic allows:
  * masked logits are replaced, so a query row that sees no key at all (padding) attends
    uniformly to all S keys, as the dense softmax over MASK_BIAS does ('chunked' reproduces
    it; 'splash' and 'cudnn' give such rows their kernels' own value; those rows carry no
    loss);
  * attention-probability dropout: `keep` [B, N, 1, S] (broadcast over queries), kept
    probabilities divided by the keep probability, in 'dense' and 'chunked'; the kernels have
    no dropout, so ModelConfig refuses 'splash' and 'cudnn' with DROPOUT_RATE > 0;
  * grouped-query attention (K < N) and different value and key widths (MLA) in every
    implementation; splash zero-pads head dims to a multiple of 128 (exact, costs FLOPs).
Cached decoding takes 'chunked' under 'splash' and 'cudnn' (their masks are causal by index;
a cache's queries sit at columns index..+T), and so do shapes splash cannot take (lengths that
are not multiples of 128, e.g. the parameter init's dummy batch); a run whose training length
splash cannot take is refused before it starts (`check_run`).
"""
import functools
import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.model import partitioning as p
from openmoe_jax.planning import target

MASK_BIAS = -1e10
_NEG = -1e30                      # running max before any visible key ('chunked')
DENSE_LOGITS_BUDGET = 1 << 30     # 'auto': dense while B x N x T x S x 4 bytes stay under 1 GiB
SPLASH_LANES = 128                # splash: sequence blocks and head dims in multiples of this
# Mosaic has no bfloat16 matmul on these (XLA:TPU: "Unsupported matmul RHS type on target:
# vector<128x128xbf16>", benchmarks/RESULTS.md): splash does not compile there.
SPLASH_UNSUPPORTED_TPUS = ("v2", "v3")


class AttentionMask(NamedTuple):
  """Who sees whom, without the [B, 1, T, S] array (module docstring).

  q_segment: int32[B, T]; kv_segment: int32[B, S]; q_cols: int32[B, T]; kv_cols: int32[S].
  """
  q_segment: jax.Array
  kv_segment: jax.Array
  q_cols: jax.Array
  kv_cols: jax.Array

  @classmethod
  def for_training(cls, segment_ids, real) -> "AttentionMask":
    """Packed training and scoring: causal by index, same segment, both tokens real
    (`layers.attention_mask` as a spec)."""
    b, t = segment_ids.shape
    cols = jnp.arange(t, dtype=jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    return cls(jnp.where(real, seg, -1), jnp.where(real, seg, -2),
               jnp.broadcast_to(cols, (b, t)), cols)

  @classmethod
  def for_decoding(cls, index, length: int, start, cache_len: int) -> "AttentionMask":
    """Cached decoding: queries at columns index..+length, keys 0..cache_len-1, a row's keys
    left of its start (left padding) hidden."""
    b = start.shape[0]
    cols = jnp.arange(cache_len, dtype=jnp.int32)
    kv_segment = jnp.where(cols[None, :] >= start[:, None], 0, -2).astype(jnp.int32)
    q_cols = jnp.broadcast_to((index + jnp.arange(length)).astype(jnp.int32), (b, length))
    return cls(jnp.zeros((b, length), jnp.int32), kv_segment, q_cols, cols)

  def dense(self):
    """bool[B, 1, T, S]."""
    m = self.kv_cols[None, None, :] <= self.q_cols[:, :, None]
    return (m & (self.q_segment[:, :, None] == self.kv_segment[:, None, :]))[:, None]


# --------------------------------------------------------------------------- dense


def dense(q, k, v, mask, keep, *, scale: float, logit_dtype, dtype, keep_prob: float):
  """flaxformer dense_attention: q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv]; mask bool
  [B, 1, T, S]; keep None or bool [B, N, 1, S]."""
  logits = jnp.einsum("bqnh,bknh->bnqk", q.astype(logit_dtype), k.astype(logit_dtype))
  if scale != 1.0:
    logits = logits * jnp.asarray(scale, logit_dtype)
  logits = jnp.where(mask, logits, jnp.asarray(MASK_BIAS, logit_dtype))
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if keep is not None:  # bitwise nn.Dropout: select(keep, x / keep_prob, 0)
    weights = jax.lax.select(jnp.broadcast_to(keep, weights.shape), weights / keep_prob,
                             jnp.zeros_like(weights))
  return jnp.einsum("bnqk,bknh->bqnh", weights, v)


# --------------------------------------------------------------------------- chunked


def _pad_to(x, length: int, axis: int, value=0):
  extra = length - x.shape[axis]
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=value)


def _blocks(x, block: int):
  """[B, L, ...] -> [L / block, B, block, ...]."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _unblock(x):
  """[n, B, block, ...] -> [B, n * block, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _visible(qs, qc, ks, kc):
  """bool[B, bq, bk] of one block pair."""
  return (kc[:, None, :] <= qc[:, :, None]) & (qs[:, :, None] == ks[:, None, :])


def _kv_blocks(k, v, ks, kc, w, bk):
  """The key-side scan inputs: k/v blocks [nk, B, bk, N, H], segments [nk, B, bk], columns
  [nk, B, bk] (broadcast over batch), keep weights [nk, B, N, bk]."""
  b = k.shape[0]
  kc = jnp.broadcast_to(kc, (b, kc.shape[-1]))
  wb = jnp.moveaxis(w.reshape(b, w.shape[1], -1, bk), 2, 0)
  return (_blocks(k, bk), _blocks(v, bk), _blocks(ks, bk), _blocks(kc, bk), wb)


def _chunked_forward(q, k, v, qs, qc, ks, kc, w, scale, bq, bk):
  """Online softmax over key blocks for each query block. Returns (o float32 [B, T, N, Hv],
  lse [B, N, T], seen bool [B, N, T]: the row saw at least one key)."""
  b, _, n, _ = q.shape
  hv = v.shape[-1]
  kv = _kv_blocks(k, v, ks, kc, w, bk)

  def one_q_block(xs):
    qb, qsb, qcb = xs

    def step(carry, kvb):
      kb, vb, ksb, kcb, wb = kvb
      vis = _visible(qsb, qcb, ksb, kcb)[:, None]           # [B, 1, bq, bk]

      def compute(carry):
        m, l, acc = carry
        s = jnp.einsum("bqnh,bknh->bnqk", qb, kb, preferred_element_type=jnp.float32) * scale
        s = jnp.where(vis, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        pr = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(pr, axis=-1)
        pv = jnp.einsum("bnqk,bknh->bnqh", (pr * wb[:, :, None, :]).astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

      return jax.lax.cond(jnp.any(vis), compute, lambda c: c, carry), None

    init = (jnp.full((b, n, bq), _NEG, jnp.float32), jnp.zeros((b, n, bq), jnp.float32),
            jnp.zeros((b, n, bq, hv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, kv)
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.swapaxes(o, 1, 2), lse, seen

  o, lse, seen = jax.lax.map(one_q_block, (_blocks(q, bq), _blocks(qs, bq), _blocks(qc, bq)))
  # [nq, B, bq, N, Hv], [nq, B, N, bq] -> [B, T, N, Hv], [B, N, T]
  unq = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, n, -1)
  return _unblock(o), unq(lse), unq(seen)


def _uniform(v, w, num_keys: int):
  """What a row that sees no key gets under the dense softmax over MASK_BIAS: the mean over
  all keys of the kept values, [B, N, Hv] float32."""
  return jnp.einsum("bnk,bknh->bnh", w, v.astype(jnp.float32)) / num_keys


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _chunked(q, k, v, qs, qc, ks, kc, w, scale, bq, bk, num_keys):
  return _chunked_fwd(q, k, v, qs, qc, ks, kc, w, scale, bq, bk, num_keys)[0]


def _chunked_fwd(q, k, v, qs, qc, ks, kc, w, scale, bq, bk, num_keys):
  o, lse, seen = _chunked_forward(q, k, v, qs, qc, ks, kc, w, scale, bq, bk)
  u = _uniform(v, w, num_keys)
  o = jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], o, u[:, None])
  return o, (q, k, v, qs, qc, ks, kc, w, o, lse, seen)


def _chunked_bwd(scale, bq, bk, num_keys, res, do):
  q, k, v, qs, qc, ks, kc, w, o, lse, seen = res
  b, t, n, _ = q.shape
  do = do.astype(jnp.float32)
  seen_t = jnp.swapaxes(seen, 1, 2)[..., None]                  # [B, T, N, 1]
  do_seen = jnp.where(seen_t, do, 0.0)
  d_row = jnp.swapaxes(jnp.sum(do_seen * o, axis=-1), 1, 2)     # [B, N, T] rowsum(dO . O)
  kv = _kv_blocks(k, v, ks, kc, w, bk)

  def one_q_block(carry, xs):
    dk_acc, dv_acc = carry
    qb, qsb, qcb, dob, lseb, db = xs

    def step(dq, kvb):
      kb, vb, ksb, kcb, wb = kvb
      vis = _visible(qsb, qcb, ksb, kcb)[:, None]

      def compute(dq):
        s = jnp.einsum("bqnh,bknh->bnqk", qb, kb, preferred_element_type=jnp.float32) * scale
        pr = jnp.where(vis, jnp.exp(s - lseb[..., None]), 0.0)
        wp = pr * wb[:, :, None, :]
        dv = jnp.einsum("bnqk,bqnh->bknh", wp, dob)
        dp = jnp.einsum("bqnh,bknh->bnqk", dob, vb.astype(jnp.float32)) * wb[:, :, None, :]
        ds = pr * (dp - db[..., None]) * scale
        dq = dq + jnp.einsum("bnqk,bknh->bqnh", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bnqk,bqnh->bknh", ds, qb.astype(jnp.float32))
        return dq, dk, dv

      def skip(dq):
        return (dq, jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))

      dq, dk, dv = jax.lax.cond(jnp.any(vis), compute, skip, dq)
      return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qb.shape, jnp.float32), kv)
    return (dk_acc + _unblock(dk), dv_acc + _unblock(dv)), dq

  blk_n = lambda x: jnp.moveaxis(x.reshape(b, n, -1, bq), 2, 0)  # [B, N, T] -> [nq, B, N, bq]
  xs = (_blocks(q, bq), _blocks(qs, bq), _blocks(qc, bq), _blocks(do_seen, bq), blk_n(lse),
        blk_n(d_row))
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(one_q_block, init, xs)
  # Rows that saw nothing took the uniform mean of the kept values: their dO reaches v only.
  do_unseen = jnp.sum(jnp.where(seen_t, 0.0, do), axis=1)       # [B, N, Hv]
  dv = dv + jnp.einsum("bnk,bnh->bknh", w, do_unseen) / num_keys
  return (_unblock(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None, None, None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked(q, k, v, mask: AttentionMask, keep, *, scale: float, keep_prob: float, block: int,
            dtype):
  """Blockwise attention (module docstring): q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv]
  (key/value heads already repeated to N). Returns [B, T, N, Hv] in `dtype`."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  bq, bk = min(block, t), min(block, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  if keep is None:
    w = jnp.ones((b, n, s), jnp.float32)
  else:
    w = keep[:, :, 0, :].astype(jnp.float32) / keep_prob
  # Padded queries see nothing (discarded); padded keys are seen by no one and weigh 0.
  qs = _pad_to(mask.q_segment, tp, 1, -1)
  qc = _pad_to(mask.q_cols, tp, 1, 0)
  ks = _pad_to(mask.kv_segment, sp, 1, -3)
  kc = _pad_to(mask.kv_cols, sp, 0, 0)
  out = _chunked(_pad_to(q, tp, 1), _pad_to(k, sp, 1), _pad_to(v, sp, 1), qs, qc, ks, kc,
                 _pad_to(w, sp, 2), float(scale), bq, bk, s)
  return out[:, :t].astype(dtype)


# --------------------------------------------------------------------------- splash


def _splash_block(length: int, block: int) -> int:
  """The largest multiple of 128 <= block dividing length."""
  bl = max(SPLASH_LANES, block - block % SPLASH_LANES)
  while length % bl:
    bl -= SPLASH_LANES
  return bl


def check_splash(q_len: int, kv_len: int) -> Optional[str]:
  """Why splash cannot take this shape, or None."""
  if q_len != kv_len:
    return f"splash attention needs as many queries as keys, got {q_len} and {kv_len}"
  if q_len % SPLASH_LANES:
    return (f"ATTENTION_IMPL='splash' needs a sequence length that is a multiple of "
            f"{SPLASH_LANES}, got {q_len}; use 'chunked' or pad TASK_FEATURE_LENGTHS")
  return None


def _pad_heads(x, width: int):
  return _pad_to(x, -(-width // SPLASH_LANES) * SPLASH_LANES, 3)


def splash(q, k, v, mask: AttentionMask, *, scale: float, block: int, dtype):
  """Pallas splash attention: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, n, h = q.shape
  hv = v.shape[-1]
  why = check_splash(t, k.shape[1])
  if why:
    raise ValueError(why)
  bl = _splash_block(t, block)
  interpret = target.platform() != "tpu"
  q = (q * jnp.asarray(scale, q.dtype)) if scale != 1.0 else q
  q, k, v = _pad_heads(q, h), _pad_heads(k, h), _pad_heads(v, hv)
  sizes = sk.BlockSizes(block_q=bl, block_kv=bl, block_kv_compute=bl, block_q_dkv=bl,
                        block_kv_dkv=bl, block_kv_dkv_compute=bl, block_q_dq=bl, block_kv_dq=bl)

  def local(q, k, v, qs, ks):
    heads = q.shape[2]
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * heads),
                                block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    per_example = lambda q, k, v, qs, ks: kernel(
        jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1),
        segment_ids=sk.SegmentIds(qs, ks))
    return jnp.swapaxes(jax.vmap(per_example)(q, k, v, qs, ks), 1, 2)

  args = (q, k, v, mask.q_segment, mask.kv_segment)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = local(*args)
  else:
    from jax.sharding import PartitionSpec as P
    batch, length, heads, _ = nn.logical_to_mesh_axes((p.BATCH, p.LENGTH, p.HEADS, p.KV))
    if length is not None:
      raise ValueError("ATTENTION_IMPL='splash' shards batch and heads; the rules shard the "
                       f"length axis over {length!r}")
    if k.shape[2] % max(_axis_size(mesh, heads), 1):
      heads = None  # fewer key/value heads than head shards: heads replicated
    spec = P(batch, None, heads, None)
    out = jax.shard_map(local, in_specs=(spec, spec, spec, P(batch, None), P(batch, None)),
                        out_specs=spec, check_vma=False)(*args)
  return out[..., :hv].astype(dtype)


def splash_train_flops(cfg, batch: int, seq_len: int) -> float:
  """FLOPs the splash kernels of one forward and backward pass do over `batch` rows (every
  layer): per layer 2 x B x N x (H' + Hv') x T^2 for the forward (H', Hv': the head dims
  padded to 128) on the causal blocks only ((n + 1) / 2n of them, n = T / block), and 3.5x that
  for the backward (its dq kernel recomputes the logits and does 2 more matmuls, its dk/dv
  kernel 3 more). XLA's cost model cannot see inside the kernels; plans add this."""
  pad = lambda d: -(-d // SPLASH_LANES) * SPLASH_LANES
  n = seq_len // _splash_block(seq_len, cfg.attention_block)
  causal = (n + 1) / (2 * n)
  forward = 2 * batch * cfg.num_heads * (pad(cfg.head_dim) + pad(cfg.value_head_dim)) \
      * seq_len ** 2 * causal
  return 4.5 * forward * cfg.num_layers


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


# --------------------------------------------------------------------------- cudnn


def cudnn(q, k, v, mask: AttentionMask, *, scale: float, dtype, implementation="cudnn"):
  """jax.nn.dot_product_attention (cuDNN's fused flash attention on GPU): GQA natively, the
  packing mask as a boolean [B, 1, T, S] (cuDNN takes it as a bias: B x T x S, not N x)."""
  if implementation == "cudnn" and target.platform() != "gpu":
    raise ValueError(f"ATTENTION_IMPL='cudnn' runs on GPUs only; this is {target.platform()}: "
                     "use 'auto', 'dense' or 'chunked'")
  hv = v.shape[-1]
  if hv != q.shape[-1]:  # cuDNN wants equal key and value widths (MLA): pad v, exact
    v = _pad_to(v, q.shape[-1], 3)
  out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                     mask=mask.dense(), scale=scale,
                                     implementation=implementation)
  return out[..., :hv].astype(dtype)


# --------------------------------------------------------------------------- dispatch


def check_run(cfg, seq_len: int) -> None:
  """A run's settings against its attention implementation (before anything is written):
  ValueError (one line) for splash at a length it cannot take, or cuDNN off a GPU."""
  if cfg.attention_impl == "splash":
    why = check_splash(seq_len, seq_len)
    if why:
      raise ValueError(why)
    if target.tpu_generation() in SPLASH_UNSUPPORTED_TPUS:
      raise ValueError(f"ATTENTION_IMPL='splash' needs TPU v4 or later: Mosaic has no bfloat16 "
                       f"matmul on {target.tpu_generation()}; use 'chunked' or 'dense'")
  if cfg.attention_impl == "cudnn" and target.platform() != "gpu":
    raise ValueError(f"ATTENTION_IMPL='cudnn' runs on GPUs only; this is {target.platform()}: "
                     "use 'auto', 'dense' or 'chunked'")


def resolve(cfg, *, batch: int, q_len: int, kv_len: int, decoding: bool = False,
            platform: Optional[str] = None, shards: int = 1) -> str:
  """The implementation `attend` runs: cfg.attention_impl, 'auto' chosen (module docstring);
  decoding under 'splash' / 'cudnn' takes 'chunked'. batch: rows of the whole batch; shards:
  the devices batch and heads are split over (the dense budget is per device)."""
  impl = cfg.attention_impl
  platform = platform or target.platform()
  if impl == "auto":
    if platform == "tpu" and cfg.dropout_rate == 0 and check_splash(q_len, kv_len) is None \
        and not decoding and target.tpu_generation() not in SPLASH_UNSUPPORTED_TPUS:
      return "splash"
    if platform == "gpu" and cfg.dropout_rate == 0 and not decoding:
      return "cudnn"
    dense_bytes = batch * cfg.num_heads * q_len * kv_len * 4 // max(shards, 1)
    return "chunked" if dense_bytes > DENSE_LOGITS_BUDGET else "dense"
  if impl in ("splash", "cudnn") and decoding:
    return "chunked"
  if impl == "splash" and check_splash(q_len, kv_len):
    return "chunked"  # e.g. the parameter init's short dummy batch; runs are checked up front
  return impl


def attend(q, k, v, mask, keep, *, cfg, remat: bool = False, decoding: bool = False):
  """softmax(q k^T * cfg.attention_scale, masked) v by cfg.attention_impl.

  q: [B, T, N, H]; k: [B, S, K, H], v: [B, S, K, Hv] with K dividing N (query head j reads
  key/value head j // (N / K), transformers' `repeat_kv`); mask: an AttentionMask, or a bool
  [B, 1, T, S] array (then always 'dense'); keep: None or bool [B, N, 1, S]. remat: recompute
  the dense probabilities in the backward pass (REMAT_POLICY='attention'; the other
  implementations never keep them). Returns [B, T, N, Hv] in the activation dtype.
  """
  b, t, n, _ = q.shape
  if isinstance(mask, AttentionMask):
    impl = resolve(cfg, batch=b, q_len=t, kv_len=k.shape[1], decoding=decoding,
                   shards=p.logical_axis_size(p.BATCH) * p.logical_axis_size(p.HEADS))
  else:
    impl = "dense"
  keep_prob = 1.0 - cfg.dropout_rate
  if impl in ("splash", "cudnn"):
    if keep is not None:
      raise ValueError(f"ATTENTION_IMPL={impl!r} has no attention dropout: set DROPOUT_RATE=0 "
                       "or use 'chunked'")
    if impl == "splash":
      return splash(q, k, v, mask, scale=cfg.attention_scale, block=cfg.attention_block,
                    dtype=cfg.dtype)
    return cudnn(q, k, v, mask, scale=cfg.attention_scale, dtype=cfg.dtype)
  if k.shape[2] != n:
    k, v = (jnp.repeat(y, n // y.shape[2], axis=2) for y in (k, v))
    k, v = (p.constrain(y, (p.BATCH, p.LENGTH, p.HEADS, p.KV)) for y in (k, v))
  if impl == "chunked":
    return chunked(q, k, v, mask, keep, scale=cfg.attention_scale, keep_prob=keep_prob,
                   block=cfg.attention_block, dtype=cfg.dtype)
  # flaxformer dense_attention (float32_logits=False): logits and softmax in the activation dtype.
  logit_dtype = jnp.float32 if cfg.float32_attention_logits else cfg.dtype
  core = functools.partial(dense, scale=cfg.attention_scale, logit_dtype=logit_dtype,
                           dtype=cfg.dtype, keep_prob=keep_prob)
  if remat:
    core = jax.checkpoint(core)
  if isinstance(mask, AttentionMask):
    mask = mask.dense()
  return core(q, k, v, mask, keep)
