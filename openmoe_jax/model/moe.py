"""The routed-experts sublayer of an OpenMoE MoE layer: router, dispatch, experts, combine.

Legend: B batch, L length, D embed, G token groups, T tokens per group, E experts, K experts per
token, C expert capacity, F expert hidden. The routing math lives in `routing.py`; this module
moves tokens. With `capacity_mode='fixed'` (OpenMoE) two dispatch implementations compute the
same function:
  * 'gather': slot -> token indices, gathered per group (fast on CPU/GPU);
  * 'einsum': flaxformer's one-hot dispatch/combine tensors [G, T, E, C] (XLA:TPU all-gathers the
    groups over the expert axis for it: 'auto' picks gather on TPU too, benchmarks/RESULTS.md).
With experts sharded, the [G, ...] -> [E, G, ...] relayout under the sharding constraints below
is where the compiler places the all-to-all (flaxformer notation G_ed -> E_ed).
The 'adaptive' and 'dropless' modes give experts variable token counts: sort by expert, grouped
matmul, unsort (`ragged_dispatch.py`, `grouped.py`), with an explicit all-to-all under shard_map.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from openmoe_jax.model import ragged_dispatch
from openmoe_jax.model import partitioning as p
from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.layers import Dense, MlpBlock, gated_activation, kernel_init


def resolve_dispatch(mode: str) -> str:
  """'auto' is 'gather' on every platform (the faster of the two on CPU and in XLA:TPU's
  estimates, benchmarks/RESULTS.md); the value stays so that gin files and saved model configs
  binding 'auto' keep working, and so a future platform may choose differently."""
  if mode != "auto":
    return mode
  return "gather"


class _Kernel(nn.Module):
  """Holds one `kernel` parameter, so paths read .../expert/wi_0/kernel as in flaxformer."""
  shape: tuple
  axes: tuple
  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    init = kernel_init(self.cfg.scale, "normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    return self.param("kernel", p.param_init(init, self.axes), self.shape, self.cfg.weight_dtype)


class Experts(nn.Module):
  """E independent three-projection FFNs (parameters .../expert/{wi_0,wi_1,wo}/kernel).

  `__call__` runs them on capacity buffers [E, G, C, D]; `ragged` on routed tokens of any count
  per expert (the 'adaptive' and 'dropless' capacity modes, `ragged_dispatch.py`).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    e, d, f = cfg.num_experts, cfg.emb_dim, cfg.expert_mlp_dim
    in_axes = (p.EXPERT, p.MLP_EMBED, p.EXPERT_MLP)
    self.wi_0 = _Kernel((e, d, cfg.gate_width * f), in_axes, cfg)
    self.wi_1 = _Kernel((e, d, f), in_axes, cfg)
    self.wo = _Kernel((e, f, d), (p.EXPERT, p.EXPERT_MLP, p.MLP_EMBED), cfg)
    # flaxformer's expert MlpBlock, vmapped over experts: one intermediate-dropout mask per
    # expert, broadcast over its G*C tokens (broadcast_dims=(-2,) on [G*C, F]).
    self.dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(1, 2))

  def _kernels(self):
    return tuple(k().astype(self.cfg.dtype) for k in (self.wi_0, self.wi_1, self.wo))

  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    wi_0, wi_1, wo = self._kernels()
    x = x.astype(cfg.dtype)
    h = gated_activation(jnp.einsum("egcd,edf->egcf", x, wi_0), jnp.einsum("egcd,edf->egcf", x, wi_1))
    h = self.dropout(h, deterministic=deterministic)
    h = p.constrain(h, (p.EXPERT, p.EXPERT_REPLICAS, p.LENGTH, p.EXPERT_MLP))
    # The output stays expert-major until the caller's relayout (flaxformer constrains both
    # sides of its swapaxes): without it XLA may compute this einsum in the token-major layout
    # that follows, all-gathering every expert's `wo` (and, backward, the buffers over `data`).
    return p.constrain(jnp.einsum("egcf,efd->egcd", h, wo),
                       (p.EXPERT, p.EXPERT_REPLICAS, p.LENGTH, p.EMBED))

  def ragged(self, tokens, r: routing.Routing, *, deterministic: bool):
    """tokens [G, T, D] -> (outputs [G, T, K, D] zero where dropped, kept [G, T, K])."""
    cfg = self.cfg
    rate = 0.0 if deterministic else cfg.dropout_rate
    rng = self.make_rng("dropout") if rate > 0 else None
    return ragged_dispatch.ragged_ffn(tokens.astype(cfg.dtype), r.expert_index, r.kept, self._kernels(),
                               impl=cfg.grouped_matmul, buffer_factor=cfg.ep_buffer_factor,
                               dropout=(rng, rate), exchange=cfg.expert_exchange)


def _gather_dispatch(x, r: routing.Routing, num_experts: int):
  """x: [G, T, D] -> expert buffers [E, G, C, D], and the flat slot of each assignment [G, T*K]."""
  g, t, _ = x.shape
  cap = r.capacity
  dump = num_experts * cap
  slot = jnp.where(r.kept, r.expert_index * cap + r.position, dump).reshape(g, -1)
  token = jnp.broadcast_to(jnp.arange(t)[:, None], r.kept.shape[1:]).reshape(-1)
  # Empty slots point at token t (out of range: they read zeros, without copying x to append a
  # zero row); dropped assignments land in the dump slot.
  # Per-group scatter (vmapped, so the group axis stays a batch dim the partitioner keeps local).
  token_of_slot = jax.vmap(
      lambda s: jnp.full((dump + 1,), t, jnp.int32).at[s].set(token))(slot)
  token_of_slot = token_of_slot[:, :dump].reshape(g, num_experts, cap)
  buffers = jax.vmap(lambda xg, ig: xg.at[ig].get(mode="fill", fill_value=0),
                     in_axes=(0, 1), out_axes=1)(x, jnp.swapaxes(token_of_slot, 0, 1))
  return buffers, slot


def _gather_combine(expert_out, slot, r: routing.Routing, dtype):
  """expert_out: [E, G, C, D] -> [G, T, D] in `dtype`, weighting each kept assignment by its gate."""
  e, g, c, d = expert_out.shape
  flat = jnp.swapaxes(expert_out, 0, 1).reshape(g, e * c, d)
  t, k = r.kept.shape[1:]
  # Gathered k-major ([G, K*T] rows), so that each of the K terms is a contiguous [G, T, D],
  # and the K products added in order: XLA:TPU lowers einsum('gtkd,gtk->gtd') on the
  # token-major gather to a float32 loop fusion tiled (2, 128) on K, which the compiler
  # estimates far above its bytes (benchmarks/RESULTS.md). Dropped assignments (the dump slot
  # E*C, out of range) read zeros.
  slot_k = jnp.swapaxes(slot.reshape(g, t, k), 1, 2).reshape(g, k * t)
  picked = jnp.take_along_axis(flat, slot_k[..., None], axis=1, mode="fill", fill_value=0)
  picked = picked.reshape(g, k, t, d)
  w = r.combine_weights.astype(dtype)
  out = picked[:, 0].astype(dtype) * w[:, :, 0, None]
  for j in range(1, k):
    out = out + picked[:, j].astype(dtype) * w[:, :, j, None]
  return out


def _one_hot_masks(r: routing.Routing, num_experts: int, dtype, combine_dtype):
  """dispatch [G, T, E, C] (0/1 in dtype) and combine [G, T, E, C] (combine_dtype) tensors
  (flaxformer MaskedRouter)."""
  slot_one_hot = jax.nn.one_hot(jnp.where(r.kept, r.position, -1), r.capacity, dtype=dtype)
  expert_one_hot = jax.nn.one_hot(r.expert_index, num_experts, dtype=dtype)
  dispatch = jnp.einsum("gtke,gtkc->gtec", expert_one_hot, slot_one_hot)
  combine = jnp.einsum("gtke,gtkc,gtk->gtec", expert_one_hot.astype(combine_dtype),
                       slot_one_hot.astype(combine_dtype), r.combine_weights.astype(combine_dtype))
  return dispatch, combine


@flax.struct.dataclass
class MoeMetrics:
  """Per-layer routing losses and metrics (all float32)."""
  aux_loss: jax.Array
  router_z_loss: jax.Array
  dropped_fraction: jax.Array          # [] assignments of real tokens dropped
  dropped_by_position: jax.Array       # [buckets] the same, by position bucket in the row
  tokens_left_behind: jax.Array        # [] real tokens with no kept assignment
  expert_load: jax.Array               # [E] share of real-token assignments chosen per expert
  router_confidence: jax.Array         # [] mean combine weight per kept assignment
  expert_counts: jax.Array             # [E] real-token assignments chosen per expert (the
                                       # loss-free bias's load, `training/expert_bias.py`)


def _metrics(r: routing.Routing, token_mask, cfg: ModelConfig) -> MoeMetrics:
  b, length = token_mask.shape
  k = r.kept.shape[-1]  # K; E under expert choice
  real = token_mask.reshape(r.kept.shape[:2]).astype(jnp.float32)[..., None]  # [G, T, 1]
  real_k = jnp.broadcast_to(real, r.kept.shape)
  if cfg.router == "experts_choose":
    # Under expert choice a (token, expert) pair that was not picked is not a dropped choice:
    # "dropped" counts tokens no expert took (one column), the load counts picks.
    left = 1.0 - jnp.max(r.kept.astype(jnp.float32), axis=-1, keepdims=True)
    real_k, k = real, 1
    dropped = left * real
  else:
    dropped = (1.0 - r.kept.astype(jnp.float32)) * real_k
  n_assign = jnp.maximum(real_k.sum(), 1.0)
  buckets = cfg.position_buckets
  # Positions into equal buckets by a [L, buckets] one-hot and a sum, not a scatter-add: XLA
  # offloads scatters to the SparseCore on TPU v5p/v6e, which its cost model cannot time.
  in_bucket = (((jnp.arange(length) * buckets) // length)[:, None]
               == jnp.arange(buckets)[None, :]).astype(jnp.float32)
  per_pos_dropped = dropped.reshape(b, length, k).sum(axis=(0, 2))
  per_pos_total = real_k.reshape(b, length, k).sum(axis=(0, 2))
  by_bucket = jnp.sum(per_pos_dropped[:, None] * in_bucket, axis=0)
  by_bucket /= jnp.maximum(jnp.sum(per_pos_total[:, None] * in_bucket, axis=0), 1.0)
  kept_any = jnp.max(r.kept.astype(jnp.float32), axis=-1, keepdims=True) * real
  counted = (r.kept * real if cfg.router == "experts_choose" else real_k).astype(jnp.float32)
  load = jnp.sum(jax.nn.one_hot(r.expert_index, cfg.num_experts) * counted[..., None],
                 axis=(0, 1, 2))
  n_kept = jnp.maximum(jnp.sum(r.kept * real), 1.0)
  return MoeMetrics(
      aux_loss=r.aux_loss,
      router_z_loss=r.router_z_loss,
      dropped_fraction=dropped.sum() / n_assign,
      dropped_by_position=by_bucket,
      tokens_left_behind=1.0 - kept_any.sum() / jnp.maximum(real.sum(), 1.0),
      expert_load=load / (jnp.maximum(load.sum(), 1.0) if cfg.router == "experts_choose"
                          else n_assign),
      router_confidence=jnp.sum(r.combine_weights * real_k) / n_kept,
      expert_counts=load,
  )


class SharedExperts(nn.Module):
  """Always-on experts (DeepSeek-MoE, arXiv:2401.06066): one FFN of width `cfg.shared_width`
  (parameters .../mlp/shared_expert/{wi_0,wi_1,wo}/kernel), optionally times sigmoid(x w)
  (Qwen2-MoE's `shared_expert_gate`, .../mlp/shared_expert/gate/kernel [D, 1])."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    y = MlpBlock(cfg, cfg.shared_width, name="ffn")(x, deterministic=deterministic)
    if cfg.shared_expert_gate:
      gate = Dense(1, (p.EMBED, p.UNMODELED), cfg.scale, "truncated_normal", cfg,
                   out_dtype=jnp.float32, name="gate")(x)
      y = y * jax.nn.sigmoid(gate).astype(y.dtype)
    return y


class MoeLayer(nn.Module):
  """Routed experts: router (float32, no bias) -> top-k capacity routing -> experts -> combine;
  plus the shared experts' output when `num_shared_experts` > 0. With `cfg.expert_bias`, the
  parameter `expert_bias` float32[E] is added to the scores for the choice only."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, token_mask, *, deterministic: bool, return_routing: bool = False):
    """x: [B, L, D]; token_mask: bool[B, L] real tokens (metrics only: padding is routed too).

    Cached decoding (a call holds few tokens, B for one step) is routed as any call, as in
    flaxformer, which pads and groups decoding steps the same way.

    Token counts that are not a multiple of E x replicas are padded with zero tokens (rows or
    columns, flaxformer `_maybe_pad`), routed with the rest and sliced off, so any shape works.
    Output: float32 with `moe_float32_output` (OpenMoE: the router's float32 combine weights),
    else the activation dtype.
    """
    cfg = self.cfg
    b, length, d = x.shape
    pad_rows, pad_cols, n_groups, group = routing.group_layout(cfg, b, length)
    if pad_rows or pad_cols:
      x = jnp.pad(x, ((0, pad_rows), (0, pad_cols), (0, 0)))
      token_mask = jnp.pad(token_mask, ((0, pad_rows), (0, pad_cols)))
    rows, cols = b + pad_rows, length + pad_cols
    capacity = routing.group_capacity(
        cfg, group, cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor)
    tokens = p.constrain(x.reshape(n_groups, group, d), (p.BATCH, p.LENGTH, p.EMBED))
    logits = Router(cfg, name="router")(tokens)
    order_rng = None
    if cfg.capacity_order == "random" and not deterministic and self.has_rng("dropout"):
      order_rng = self.make_rng("dropout")
    bias = None
    if cfg.expert_bias:
      # Loss-free balancing: the choice's bias, trained by no gradient (training/expert_bias.py).
      bias = jax.lax.stop_gradient(self.param(
          "expert_bias", p.param_init(nn.initializers.zeros_init(), (p.UNMODELED,)),
          (cfg.num_experts,), jnp.float32))
    r = routing.route(cfg, logits, capacity, rng=order_rng, seq_len=cols, expert_bias=bias)
    experts = Experts(cfg, name="expert")
    out_dtype = jnp.float32 if cfg.moe_float32_output else cfg.dtype
    if not routing.uses_ragged_dispatch(cfg):
      y = _capacity_ffn(experts, tokens, r, cfg, deterministic, out_dtype)
    else:
      picked, kept = experts.ragged(tokens, r, deterministic=deterministic)
      r = r.replace(kept=kept, combine_weights=jnp.where(kept, r.combine_weights, 0.0))
      y = jnp.einsum("gtkd,gtk->gtd", picked.astype(out_dtype),
                     r.combine_weights.astype(out_dtype))
    y = p.constrain(y.astype(out_dtype), (p.BATCH, p.LENGTH, p.EMBED))
    y = y.reshape(rows, cols, d)[:b, :length]
    if cfg.num_shared_experts:
      y = y + SharedExperts(cfg, name="shared_expert")(x[:b, :length], deterministic=deterministic)
    metrics = _metrics(r, token_mask, cfg)
    return (y, metrics, r) if return_routing else (y, metrics)


def _capacity_ffn(experts: Experts, tokens, r: routing.Routing, cfg: ModelConfig,
                  deterministic: bool, out_dtype):
  """Fixed capacity: tokens [G, T, D] -> expert buffers [E, G, C, D] -> experts -> [G, T, D]."""
  if resolve_dispatch(cfg.dispatch) == "gather":
    buffers, slot = _gather_dispatch(tokens, r, cfg.num_experts)
    combine = lambda out: _gather_combine(out, slot, r, out_dtype)
  else:
    dispatch_mask, combine_mask = _one_hot_masks(r, cfg.num_experts, cfg.dtype, out_dtype)
    buffers = jnp.einsum("gtd,gtec->egcd", tokens.astype(cfg.dtype), dispatch_mask)
    combine = lambda out: jnp.einsum("egcd,gtec->gtd", out, combine_mask)
  # Group-major -> expert-major and back: the two relayouts that become all-to-alls.
  buffers = p.constrain(buffers, (p.EXPERT, p.EXPERT_REPLICAS, p.LENGTH, p.EMBED))
  out = experts(buffers, deterministic=deterministic)
  return combine(p.constrain(out, (p.UNMODELED, p.BATCH, p.LENGTH, p.EMBED)))


class _RouterKernel(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    init = p.param_init(nn.initializers.normal(self.cfg.router_init_stddev), (p.EMBED, p.UNMODELED))
    kernel = self.param("kernel", init, (tokens.shape[-1], self.cfg.num_experts),
                        self.cfg.weight_dtype)
    return jnp.einsum("gtd,de->gte", tokens.astype(jnp.float32), kernel.astype(jnp.float32))


class _RouterWeights(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    return _RouterKernel(self.cfg, name="w")(tokens)


class Router(nn.Module):
  """Router logits float32[G, T, E], no bias; parameter at router/router_weights/w/kernel [D, E]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    return _RouterWeights(self.cfg, name="router_weights")(tokens)
