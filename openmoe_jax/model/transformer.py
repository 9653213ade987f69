"""The OpenMoE decoder-only transformer (flaxformer `DecoderOnly` + `SparseDecoderLayer`).

    h = embed(tokens)
    for each layer: h += Attn(norm(h));  h += FFN(norm(h))            (dense layer)
                or: h += Attn(norm(h));  h += MoE(norm(h));  h += ExtraFFN(norm(h))  (MoE layer;
                                                  ExtraFFN only with moe_extra_mlp, OpenMoE's)
    with shared experts MoE(x) = routed(x) + [sigmoid(x w) *] shared(x) (DeepSeek-MoE, Qwen2-MoE)
    logits = logits_dense(norm(h))   (float32, untied)

Legend: B batch, L length, D embed, V vocab, E experts. Parameter paths mirror flaxformer's
(`decoder/layers_{i}/self_attention/query/kernel`, `.../mlp/expert/wi_0/kernel`, ...).
"""
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from openmoe_jax.model import partitioning as p
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.attention import AttentionMask
from openmoe_jax.model.layers import Attention, Dense, Embed, MlpBlock, RMSNorm, dropout
from openmoe_jax.model.mla import LatentAttention
from openmoe_jax.model import mla
from openmoe_jax.model.moe import MoeLayer, MoeMetrics


def logit_mask(decoder_input_tokens):
  """flaxformer `get_decoder_logit_mask`: real tokens, keeping each packed sequence's 0-BOS."""
  shifted = jnp.pad(decoder_input_tokens[:, 1:], ((0, 0), (0, 1)))
  first = jnp.arange(decoder_input_tokens.shape[1])[None, :] == 0
  return (decoder_input_tokens > 0) | (shifted > 0) | first


@flax.struct.dataclass
class DecodeCache:
  """Preallocated key/value cache of every layer for cached decoding (t5x `decode=True`).

  keys, values: per layer [B, S, K, H], K key/value heads (logical axes batch, length, heads,
    kv); under multi-head latent attention the latent [B, S, 1, kv_lora_rank] and the rotary
    key [B, S, 1, qk_rope_head_dim] (`cache_layout`);
  index: int32[] the column the next call writes at; start: int32[B] each row's first real
  column (prompts are left-padded, so a row's positions are column - start).
  """
  keys: tuple
  values: tuple
  index: jax.Array
  start: jax.Array


def cache_layout(cfg: ModelConfig) -> tuple:
  """((heads, width) of keys, (heads, width) of values, their logical axes) per layer."""
  if cfg.mla:
    return (*mla.cache_widths(cfg), mla.CACHE_AXES)
  return ((cfg.kv_heads, cfg.head_dim), (cfg.kv_heads, cfg.head_dim),
          (p.BATCH, p.LENGTH, p.HEADS, p.KV))


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  sparse: bool

  @nn.compact
  def __call__(self, h, positions, mask, token_mask, deterministic: bool, cache=None,
               cache_index=None):
    cfg = self.cfg
    keep = token_mask[..., None].astype(cfg.dtype)
    drop = lambda y: dropout(cfg, y, deterministic)  # post-sublayer dropouts, length-broadcast
    x = RMSNorm(cfg, name="pre_self_attention_layer_norm")(h) * keep
    attention = LatentAttention if cfg.mla else Attention
    attn = attention(cfg, name="self_attention")(x, positions, mask, deterministic=deterministic,
                                                 cache=cache, cache_index=cache_index)
    attn, cache = attn if cache is not None else (attn, None)
    # From the first MoE layer on, h is float32 (moe_float32_output): bf16 sublayer outputs promote.
    h = h + drop(attn)
    h = p.constrain(h, (p.BATCH, p.LENGTH, p.EMBED))
    x = RMSNorm(cfg, name="pre_mlp_layer_norm")(h) * keep
    metrics = None
    if self.sparse:
      y, metrics = MoeLayer(cfg, name="mlp")(x, token_mask, deterministic=deterministic)
      h = h + drop(y)
      if cfg.moe_extra_mlp:  # OpenMoE's extra dense FFN after the experts
        x = RMSNorm(cfg, name="pre_extra_mlp_layer_norm")(h) * keep
        h = h + drop(MlpBlock(cfg, cfg.mlp_dim, name="extra_mlp")(x, deterministic=deterministic))
    else:
      h = h + drop(MlpBlock(cfg, cfg.mlp_dim, name="mlp")(x, deterministic=deterministic))
    h = p.constrain(h, (p.BATCH, p.LENGTH, p.EMBED))
    return (h, metrics) if cache is None else (h, metrics, cache)


class Decoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, positions, mask, token_mask, *, deterministic: bool, cache=None):
    cfg = self.cfg
    h = dropout(cfg, h, deterministic)  # flaxformer Decoder.input_dropout on the embeddings
    all_metrics, new_kv = [], []
    layer_cls = DecoderLayer
    if cfg.remat_policy in ("full", "dots") and cache is None:  # 'attention': layers.attend
      policy = (None if cfg.remat_policy == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      layer_cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(5,))
    for i in range(cfg.num_layers):
      layer = layer_cls(cfg, cfg.is_moe_layer(i), name=f"layers_{i}")
      if cache is None:
        h, metrics = layer(h, positions, mask, token_mask, deterministic)
      else:
        h, metrics, kv = layer(h, positions, mask, token_mask, deterministic,
                               (cache.keys[i], cache.values[i]), cache.index)
        new_kv.append(kv)
      if metrics is not None:
        all_metrics.append(metrics)
    h = dropout(cfg, RMSNorm(cfg, name="decoder_norm")(h), deterministic)  # output_dropout
    # flaxformer DecoderOnly multiplies the final activations by the logit mask: padding -> 0.
    h = h * token_mask[..., None].astype(h.dtype)
    logits = Dense(cfg.vocab_size, (p.EMBED, p.VOCAB), cfg.scale, "truncated_normal", cfg,
                   out_dtype=jnp.float32, name="logits_dense")(h)
    logits = p.constrain(logits, (p.BATCH, p.LENGTH, p.VOCAB))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *all_metrics) if all_metrics else None
    if cache is None:
      return logits, stacked
    keys, values = (tuple(kv[j] for kv in new_kv) for j in (0, 1))
    return logits, stacked, cache.replace(keys=keys, values=values,
                                          index=cache.index + h.shape[1])


class Transformer(nn.Module):
  """OpenMoE decoder-only LM. Returns (float32 logits [B, L, V], MoeMetrics stacked over MoE layers
  or None for a dense model)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, *, deterministic: bool = True,
               cache: Optional[DecodeCache] = None):
    """Args:
      decoder_input_tokens: int32[B, L] (targets shifted right, BOS = 0).
      decoder_target_tokens: int32[B, L] or None; > 0 marks real tokens for the attention mask.
      decoder_segment_ids: int32[B, L] packed-sequence ids (0 = padding) or None.
      decoder_positions: int32[B, L] or None (then 0..L-1).
      deterministic: eval mode (no dropout, eval capacity factor).
      cache: cached decoding (`decoding.py`): decoder_input_tokens [B, T] are written at columns
        cache.index..+T; positions and masks come from the cache (the other arguments are
        ignored) and the updated cache is returned as a third output.
    """
    if cache is not None:
      return self._decode(decoder_input_tokens, cache)
    b, length = decoder_input_tokens.shape
    if decoder_positions is None:
      decoder_positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones((b, length), jnp.int32)
    real = (decoder_target_tokens > 0 if decoder_target_tokens is not None
            else jnp.ones((b, length), bool))
    mask = AttentionMask.for_training(decoder_segment_ids, real)
    token_mask = logit_mask(decoder_input_tokens)
    h = Embed(self.cfg, name="token_embedder")(decoder_input_tokens)
    h = p.constrain(h, (p.BATCH, p.LENGTH, p.EMBED))
    return Decoder(self.cfg, name="decoder")(h, decoder_positions, mask, token_mask,
                                             deterministic=deterministic)

  def _decode(self, tokens, cache: DecodeCache):
    t, s = tokens.shape[1], cache.keys[0].shape[1]
    cols = cache.index + jnp.arange(t)
    positions = cols[None, :] - cache.start[:, None]
    token_mask = positions >= 0
    mask = AttentionMask.for_decoding(cache.index, t, cache.start, s)
    h = Embed(self.cfg, name="token_embedder")(tokens)
    h = p.constrain(h, (p.BATCH, p.LENGTH, p.EMBED))
    return Decoder(self.cfg, name="decoder")(h, jnp.maximum(positions, 0), mask,
                                             token_mask, deterministic=True, cache=cache)


def cross_entropy_with_z_loss(logits, targets, weights, z_loss: float):
  """Sum over tokens of w * (CE + z_loss * logZ^2), and of w * CE, and of w * logZ^2.

  logits: float32[B, L, V]; targets: int32[B, L]; weights: float[B, L].
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot contraction instead of a gather: with the vocabulary sharded over `model`, a
  # gather along it would all-gather the full-vocabulary logits on every device.
  target_logit = jnp.einsum("blv,blv->bl", logits,
                            jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
  ce = log_z - target_logit
  w = weights.astype(jnp.float32)
  return jnp.sum(w * (ce + z_loss * log_z**2)), jnp.sum(w * ce), jnp.sum(w * log_z**2)


def compute_loss(cfg: ModelConfig, logits, metrics: Optional[MoeMetrics], targets, weights):
  """OpenMoE objective (t5x contrib/moe `_moe_loss_fn`):

  [sum_t w_t (CE_t + Z_LOSS logZ_t^2)] / sum_t w_t + AUX * mean_layers(aux) + RZ * mean_layers(rz).
  Returns (total loss, dict of float32 scalars).
  """
  total_ce, ce_sum, logz_sq = cross_entropy_with_z_loss(logits, targets, weights, cfg.z_loss)
  num_tokens = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)
  loss = total_ce / num_tokens
  aux = jnp.mean(metrics.aux_loss) if metrics is not None else jnp.float32(0)
  rz = jnp.mean(metrics.router_z_loss) if metrics is not None else jnp.float32(0)
  loss = loss + cfg.aux_loss_factor * aux + cfg.router_z_loss_factor * rz
  parts = {"loss": loss, "cross_entropy": ce_sum / num_tokens,
           "z_loss": cfg.z_loss * logz_sq / num_tokens, "aux_loss": aux, "router_z_loss": rz,
           "num_tokens": num_tokens}
  return loss, parts
