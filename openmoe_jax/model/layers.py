"""Dense building blocks of the OpenMoE decoder (flaxformer T5.1.1 decoder-only conventions).

Legend: B batch, L length, D embed, N heads, H head dim, F mlp hidden, V vocab.
Kernels are stored 2-D ([D, N*H] for attention) as flaxformer's DenseGeneral stores them, so
original checkpoints load without reshaping.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from openmoe_jax.model import attention
from openmoe_jax.model import partitioning as p
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model import rope
from openmoe_jax.model.rope import apply_rope, rotate_half  # noqa: F401  (their old home)

MASK_BIAS = attention.MASK_BIAS


def kernel_init(scale: float, distribution: str = "truncated_normal", in_axis=-2, out_axis=-1,
                batch_axis=()):
  return nn.initializers.variance_scaling(scale, "fan_in", distribution, in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


class RMSNorm(nn.Module):
  """T5 layer norm: x * rsqrt(mean(x^2) + eps) * scale, normalised in float32.

  As flaxformer `components/layer_norm.py` `T5LayerNorm` (OpenMoE): the normalised value is cast
  to the activation dtype, then multiplied by the scale in that dtype (`float32_norm`: in float32).
  """
  cfg: ModelConfig
  axis: str = p.EMBED  # the scale's logical axis (p.KV / p.JOINED_KV for the QK norms)
  eps: float = 0.0     # 0: cfg.norm_eps

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", p.param_init(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    eps = self.eps or self.cfg.norm_eps
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    dtype = jnp.float32 if self.cfg.float32_norm else self.cfg.dtype
    scale = scale.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return (y.astype(dtype) * scale).astype(self.cfg.dtype)


def dropout(cfg: ModelConfig, x, deterministic: bool, broadcast_dims=(-2,)):
  """flaxformer's dropout (`DROPOUT_FACTORY`, moe_decoder_only.gin): one mask per row, broadcast
  over the length axis (-2 of [B, L, D])."""
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=broadcast_dims)(
      x, deterministic=deterministic)


class Dense(nn.Module):
  """Bias-free projection of the last axis with a 2-D kernel [in, out]."""
  features: int
  axes: tuple
  init_scale: float
  distribution: str
  cfg: ModelConfig
  out_dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel",
                        p.param_init(kernel_init(self.init_scale, self.distribution), self.axes),
                        (x.shape[-1], self.features), self.cfg.weight_dtype)
    dtype = self.out_dtype or self.cfg.dtype
    return jnp.einsum("...d,df->...f", x.astype(dtype), kernel.astype(dtype))


class Embed(nn.Module):
  """Token embedding [V, D], init normal(1.0), no scaling."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    table = self.param("embedding", p.param_init(nn.initializers.normal(1.0), (p.VOCAB, p.EMBED)),
                       (self.cfg.vocab_size, self.cfg.emb_dim), self.cfg.weight_dtype)
    return jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)


def attention_mask(segment_ids, token_mask):
  """bool[B, 1, L, L]: causal by index, same segment, both tokens real."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length)
  mask = (idx[:, None] >= idx[None, :])[None]
  mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  mask = mask & token_mask[:, :, None] & token_mask[:, None, :]
  return mask[:, None]


def attend(q, k, v, mask, keep, *, cfg: ModelConfig, remat: bool = False,
           decoding: bool = False):
  """Scaled-dot-product attention core by cfg.attention_impl (`model/attention.py`).

  q: [B, T, N, H]; k, v: [B, S, K, H] with K key/value heads dividing N (grouped-query
  attention: query head j reads key/value head j // (N / K), transformers' `repeat_kv`);
  mask: an attention.AttentionMask or bool [B, 1, T, S]; keep: None or bool [B, N, 1, S]
  (kept attention probabilities are divided by 1 - dropout_rate, as nn.Dropout does). The
  logits are multiplied by cfg.attention_scale (1.0 for OpenMoE, whose query initialiser holds
  1/sqrt(H)).
  """
  return attention.attend(q, k, v, mask, keep, cfg=cfg, remat=remat, decoding=decoding)


class Attention(nn.Module):
  """Causal self-attention, no biases: multi-head (OpenMoE: no runtime 1/sqrt(H), folded into
  the query initialiser) or grouped-query (`num_kv_heads`), with optional QK RMSNorm
  (`qk_norm`) and logit scale (`attention_scale`) as today's families have them."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, *, deterministic: bool, cache=None, cache_index=None):
    """x: [B, T, D]; positions: int[B, T]; mask: an attention.AttentionMask (or a bool
    [B, 1, T, S] array: the dense path).

    cache: None (training, scoring) or (key, value) [B, S, K, H] (K key/value heads)
      preallocated for cached decoding: this call's keys and values are written at columns
      cache_index..+T and the queries attend over all S columns (mask decides which). Returns
      (out, new cache) then.
    """
    cfg = self.cfg
    joined = cfg.num_heads * cfg.head_dim
    def proj(name, scale, heads):
      y = Dense(heads * cfg.head_dim, (p.EMBED, p.JOINED_KV), scale, "normal", cfg, name=name)(x)
      if cfg.qk_norm == "projection" and name != "value":  # OLMoE: over the whole projection
        y = RMSNorm(cfg, p.JOINED_KV, name=f"{name}_norm")(y)
      y = y.reshape(*y.shape[:-1], heads, cfg.head_dim)
      if cfg.qk_norm == "head" and name != "value":  # Qwen3: over each head
        y = RMSNorm(cfg, p.KV, name=f"{name}_norm")(y)
      return y
    q = proj("query", cfg.scale / cfg.head_dim, cfg.num_heads)  # var scale / H == std / sqrt(H)
    k = proj("key", cfg.scale, cfg.kv_heads)
    v = proj("value", cfg.scale, cfg.kv_heads)
    q = apply_rope(q, positions, cfg.rope_max_timescale, **rope.for_config(cfg))
    k = apply_rope(k, positions, cfg.rope_max_timescale, **rope.for_config(cfg))
    q = p.constrain(q, (p.BATCH, p.LENGTH, p.HEADS, p.KV))
    k = p.constrain(k, (p.BATCH, p.LENGTH, p.HEADS, p.KV))
    if cache is not None:
      k, v = (p.constrain(jax.lax.dynamic_update_slice(c, y.astype(c.dtype), (0, cache_index, 0, 0)),
                          (p.BATCH, p.LENGTH, p.HEADS, p.KV)) for c, y in zip(cache, (k, v)))
      cache = (k, v)
    # Attention-probability dropout, broadcast over the query axis (flaxformer broadcast_dropout):
    # its keep mask [B, N, 1, S] is drawn here, with nn.Dropout's own key, so that the scores
    # can be recomputed in the backward pass ('attention' remat) from q, k, v and the masks.
    keep = None
    if cfg.dropout_rate > 0 and not deterministic:
      ones = jnp.ones((q.shape[0], cfg.num_heads, 1, k.shape[1]), cfg.dtype)
      keep = dropout(cfg, ones, deterministic) > 0
    out = attend(q, k, v, mask, keep, cfg=cfg,
                 remat=cfg.remat_policy == "attention" and cache is None,
                 decoding=cache is not None)
    out = out.reshape(*out.shape[:2], joined)
    out = Dense(cfg.emb_dim, (p.JOINED_KV, p.EMBED), cfg.scale, "normal", cfg, name="out")(out)
    return out if cache is None else (out, cache)


def gated_activation(h0, h1):
  """The FFN's hidden activation from wi_0's output h0 and wi_1's output h1 [..., F].

  OpenMoE's ('swiglu', 'linear') when h0 is [..., 2F] (`mlp_layout='openmoe'`): h0 split in
  halves a, b -> a * silu(b) * h1. The gate / up layout when h0 is [..., F] (`'gated'`,
  Llama's and today's MoE families'): silu(h0) * h1. The widths tell the two apart, so every
  expert implementation (einsum, gather, blocked, ragged_dot, Pallas) computes either layout.
  """
  if h0.shape[-1] == h1.shape[-1]:
    return jax.nn.silu(h0) * h1
  a, b = jnp.split(h0, 2, axis=-1)
  return a * jax.nn.silu(b) * h1


class MlpBlock(nn.Module):
  """FFN: wo((x wi_0)[:F] * silu((x wi_0)[F:]) * (x wi_1)) (OpenMoE), or
  wo(silu(x wi_0) * (x wi_1)) with `mlp_layout='gated'` (`gated_activation`)."""
  cfg: ModelConfig
  hidden: int

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    h0 = Dense(cfg.gate_width * self.hidden, (p.EMBED, p.MLP), cfg.scale, "truncated_normal", cfg,
               name="wi_0")(x)
    h1 = Dense(self.hidden, (p.EMBED, p.MLP), cfg.scale, "truncated_normal", cfg, name="wi_1")(x)
    h = gated_activation(h0, h1)
    h = dropout(cfg, h, deterministic)  # intermediate dropout, broadcast over length
    h = p.constrain(h, (p.BATCH, p.LENGTH, p.MLP))
    return Dense(cfg.emb_dim, (p.MLP, p.EMBED), cfg.scale, "truncated_normal", cfg, name="wo")(h)
