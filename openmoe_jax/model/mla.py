"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 section 2.1; DeepSeek-V3,
arXiv:2412.19437 section 2.1.1), as transformers `models/deepseek_v3/modeling_deepseek_v3.py`
`DeepseekV3Attention` computes it.

Legend: B batch, T query length, S key length, D embed, N heads, H = head_dim (query/key head:
H - R values without position, R = qk_rope_head_dim rotary), V = v_head_dim, Cq = q_lora_rank,
Ckv = kv_lora_rank.

    q   = x W_q                      or  RMSNorm(x W_qa) W_qb          [B, T, N, H]
    c, k_rope = x W_kva  (Ckv | R)   c = RMSNorm(c)                    (one rotary key for all heads)
    k_nope, v = c W_kvb              [B, S, N, H - R], [B, S, N, V]
    k = (k_nope | RoPE(k_rope)),  q = (q_nope | RoPE(q_rope))
    out = softmax(q . k * attention_scale) v W_o

Parameters (under .../self_attention): query/kernel [D, N*H] or query_a/kernel [D, Cq],
query_a_norm/scale [Cq], query_b/kernel [Cq, N*H]; kv_a/kernel [D, Ckv + R], kv_a_norm/scale
[Ckv]; kv_b/kernel [Ckv, N*(H - R + V)] (per head: key part, then value part); out/kernel
[N*V, D]. The two latent norms use epsilon 1e-6 whatever NORM_EPS is (transformers builds them
with its RMSNorm default).

Cached decoding keeps what MLA is for: per layer the normalised latent c [B, S, 1, Ckv] and
the rotated key k_rope [B, S, 1, R], (Ckv + R) values per token instead of 2 N H; each step
expands the cache through W_kvb (transformers' computation; the absorbed form, W_kvb folded
into the query and output projections, is not implemented).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from openmoe_jax.model import partitioning as p
from openmoe_jax.model import rope
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.layers import Dense, RMSNorm, attend, dropout

LATENT_NORM_EPS = 1e-6
CACHE_AXES = (p.BATCH, p.LENGTH, None, None)  # [B, S, 1, width]: one latent per token


def cache_widths(cfg: ModelConfig) -> tuple:
  """(heads, width) of the two per-layer cache arrays: the latent and the rotary key."""
  return (1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)


class LatentAttention(nn.Module):
  """Causal multi-head latent attention with the same call as layers.Attention."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, *, deterministic: bool, cache=None, cache_index=None):
    """x: [B, T, D]; positions: int[B, T]; mask: an attention.AttentionMask or bool[B, 1, T, S].

    cache: None or (latent [B, S, 1, Ckv], rotary key [B, S, 1, R]): this call's are written at
      columns cache_index..+T; returns (out, new cache) then.
    """
    cfg = self.cfg
    n, h, r, v_dim = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.value_head_dim
    nope = h - r
    latent_norm = functools.partial(RMSNorm, cfg, p.LORA, eps=LATENT_NORM_EPS)
    q_scale = cfg.scale / h  # as layers.Attention's query initialiser
    if cfg.q_lora_rank:
      q = Dense(cfg.q_lora_rank, (p.EMBED, p.LORA), cfg.scale, "normal", cfg, name="query_a")(x)
      q = latent_norm(name="query_a_norm")(q)
      q = Dense(n * h, (p.LORA_IN, p.JOINED_KV), q_scale, "normal", cfg, name="query_b")(q)
    else:
      q = Dense(n * h, (p.EMBED, p.JOINED_KV), q_scale, "normal", cfg, name="query")(x)
    q = q.reshape(*q.shape[:-1], n, h)
    kv = Dense(cfg.kv_lora_rank + r, (p.EMBED, p.LORA), cfg.scale, "normal", cfg,
               name="kv_a")(x)
    latent = latent_norm(name="kv_a_norm")(kv[..., :cfg.kv_lora_rank])[:, :, None, :]
    k_rope = kv[..., cfg.kv_lora_rank:][:, :, None, :]
    rotary = rope.for_config(cfg)
    q = jnp.concatenate([q[..., :nope], rope.apply_rope(q[..., nope:], positions,
                                                         cfg.rope_max_timescale, **rotary)],
                        axis=-1)
    k_rope = rope.apply_rope(k_rope, positions, cfg.rope_max_timescale, **rotary)
    if cache is not None:
      latent, k_rope = (p.constrain(jax.lax.dynamic_update_slice(c, y.astype(c.dtype),
                                                                 (0, cache_index, 0, 0)),
                                    CACHE_AXES) for c, y in zip(cache, (latent, k_rope)))
      cache = (latent, k_rope)
    kv = Dense(n * (nope + v_dim), (p.LORA_IN, p.JOINED_KV), cfg.scale, "normal", cfg,
               name="kv_b")(latent[:, :, 0])
    kv = kv.reshape(*kv.shape[:-1], n, nope + v_dim)
    k_rope = jnp.broadcast_to(k_rope.astype(kv.dtype), (*kv.shape[:2], n, r))
    k = jnp.concatenate([kv[..., :nope], k_rope], axis=-1)
    v = kv[..., nope:]
    q = p.constrain(q, (p.BATCH, p.LENGTH, p.HEADS, p.KV))
    k = p.constrain(k, (p.BATCH, p.LENGTH, p.HEADS, p.KV))
    v = p.constrain(v, (p.BATCH, p.LENGTH, p.HEADS, p.KV))
    keep = None
    if cfg.dropout_rate > 0 and not deterministic:
      ones = jnp.ones((q.shape[0], n, 1, k.shape[1]), cfg.dtype)
      keep = dropout(cfg, ones, deterministic) > 0
    out = attend(q, k, v, mask, keep, cfg=cfg,
                 remat=cfg.remat_policy == "attention" and cache is None,
                 decoding=cache is not None)
    out = out.reshape(*out.shape[:2], n * v_dim)
    out = Dense(cfg.emb_dim, (p.JOINED_KV, p.EMBED), cfg.scale, "normal", cfg, name="out")(out)
    return out if cache is None else (out, cache)
