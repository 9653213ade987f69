"""Model configuration: one frozen dataclass, validated at construction.

Field names follow our code; the gin macros that set them keep OpenMoE's flaxformer names
(`EMBED_DIM`, `NUM_HEADS`, ...), see `gin/models/*.gin`.
"""
import dataclasses
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DISPATCH_MODES = ("auto", "gather", "einsum")
REMAT_POLICIES = ("none", "full", "dots", "attention")
CAPACITY_FORMULAS = ("flaxformer", "colossalai")
CAPACITY_MODES = ("fixed", "adaptive", "dropless")
CAPACITY_ORDERS = ("openmoe", "random", "confidence")
GROUPED_MATMULS = ("auto", "blocked", "ragged_dot", "pallas")
ROUTERS = ("tokens_choose", "experts_choose")
ROUTER_SCORES = ("softmax", "softmax_selected", "sigmoid")   # routers.py
BALANCE_LOSSES = ("switch", "sequence", "global")
QK_NORMS = ("none", "head", "projection")
MLP_LAYOUTS = ("openmoe", "gated")
EXPERT_GROUP_SCORES = ("top2_sum", "max")   # routers.group_mask
ROPE_SCALINGS = ("none", "yarn")            # rope.py
ATTENTION_IMPLS = ("dense", "chunked", "splash", "cudnn", "auto")   # model/attention.py
EXPERT_EXCHANGES = ("auto", "dense", "ragged")                     # model/ragged_dispatch.py
# The fields that fix the parameters' shapes: two configs equal on these read each other's
# checkpoints (a MODEL_DIR refuses another model; an import checks its target by them).
SHAPE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "expert_mlp_dim",
                "num_layers", "num_experts", "num_sparse_layers", "num_shared_experts",
                "shared_expert_mlp_dim", "shared_expert_gate", "first_k_dense_layers",
                "moe_layer_freq", "expert_bias", "num_kv_heads", "qk_norm", "mlp_layout",
                "moe_extra_mlp", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")


def as_dtype(name_or_dtype):
  """Accepts 'bfloat16' / jnp.bfloat16 and returns the jnp dtype."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[name_or_dtype]
  return jnp.dtype(name_or_dtype).type


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes, routing and loss settings of an OpenMoE decoder-only model.

  Attributes:
    vocab_size: embedding rows (`NUM_EMBEDDINGS`; OpenMoE 256384 = 256000 + 300 padded to 128).
    emb_dim: d_model (`EMBED_DIM`).
    num_heads, head_dim: attention heads and their width, independent of emb_dim.
    mlp_dim: hidden width of dense FFNs, including the extra FFN of MoE layers (`MLP_DIM`).
    expert_mlp_dim: hidden width of each expert (`EXPERT_MLP_DIM`).
    num_layers: decoder layers (`NUM_DECODER_LAYERS`).
    num_experts: experts per MoE layer; 0 makes a dense model.
    num_sparse_layers: MoE layers (`NUM_DECODER_SPARSE_LAYERS`); layer i is MoE iff
      (i + 1) % (num_layers / num_sparse_layers) == 0.
    num_selected_experts: top-k.
    train_capacity_factor, eval_capacity_factor: cf in capacity = max(round(cf*G/E), min).
    min_expert_capacity: lower bound on the capacity.
    group_size: maximum routing group size in tokens (`GROUP_SIZE`).
    num_expert_replicas: enters the group-count constraint (groups % (E * replicas) == 0).
    renormalize_gates: divide the top-k gates by their sum (OpenMoE: False).
    no_drop: capacity = group size * k, so no assignment is ever dropped: OpenMoE's fixed
      dispatch with room for everything (parity checks against the PyTorch port's
      `router_drop_tks=False`). capacity_mode 'dropless' computes the same outputs without the
      padded slots; `routing.never_drops` is the one test for either.
    capacity_formula: 'flaxformer' (round(cf*G/E), ours) or 'colossalai' (floor(k*cf*G/E), the
      released PyTorch port's, twice as large).
    dispatch: 'gather' (index-based), 'einsum' (one-hot, flaxformer's) or 'auto' (= 'gather' on
      every platform; benchmarks/RESULTS.md compares the two).
    capacity_mode: 'fixed' (OpenMoE: C slots per expert and group), 'adaptive' (the group's E*C
      slots shared between experts by load, so drops only when the whole group is over budget)
      or 'dropless' (every assignment is computed; sort by expert + grouped matmul).
    capacity_order: queue order deciding which assignments a full expert drops: 'openmoe' (all
      first choices, then second, each left to right: drop-towards-the-end), 'random' or
      'confidence' (highest gate first), both position-independent.
    grouped_matmul: expert FFN of the 'adaptive'/'dropless' modes: 'blocked' (row tiles, fast on
      CPU), 'ragged_dot' (XLA grouped GEMM), 'pallas' (Pallas TPU grouped matmul, megablox) or
      'auto' (blocked on CPU, ragged_dot on TPU and GPU).
    ep_buffer_factor: dropless/adaptive with experts sharded: rows a device reserves per expert
      shard, as a multiple of the balanced share; 0 reserves the worst case (never drops).
      Rows that do not fit are dropped and counted in dropped_fraction.
    aux_loss_factor, router_z_loss_factor, z_loss: loss coefficients.
    dropout_rate: flaxformer's dropouts, broadcast over the length axis: embeddings, attention
      probabilities, sublayer outputs, FFN and expert hidden activations, final-norm output.
    activation_dtype, param_dtype: compute and storage dtypes (OpenMoE: bfloat16, float32).
    rope_max_timescale: RoPE theta.
    norm_eps: RMSNorm epsilon.
    scale: variance-scaling factor of kernel initialisers (OpenMoE 0.1).
    router_init_stddev: router kernel init normal stddev.
    position_buckets: how many position buckets the drop metrics use.
    remat_policy: recompute each decoder layer in the backward pass: 'none', 'full' (keep only
      layer inputs) or 'dots' (keep matmul outputs without batch dims); or 'attention': keep
      everything but the attention probabilities [B, N, T, S], recomputed from q and k (one
      more q k^T matmul and softmax per layer). Trades FLOPs for memory; the numbers are the same.
    moe_float32_output: OpenMoE (True): the experts' outputs are combined with the router's
      float32 weights and stay float32, so the residual stream is float32 from the first MoE
      layer on (flaxformer `moe_layers.MoeLayer`, router dtype 'float32'). False: cast to the
      activation dtype (a bfloat16 residual stream: less memory, not OpenMoE's numerics).
    float32_norm: False (OpenMoE, flaxformer `T5LayerNorm`): normalise in float32, cast to the
      activation dtype, multiply by the scale in that dtype. True: scale in float32, then cast.
    float32_attention_logits: False (OpenMoE, flaxformer `float32_logits=False`): attention
      logits and softmax in the activation dtype. True: in float32.
    router: 'tokens_choose' (each token its top-k experts: OpenMoE) or 'experts_choose' (each
      expert its top-C tokens of the group, Zhou et al. 2022, flaxformer
      `ExpertsChooseMaskedRouter`; C from the capacity factor; fixed capacity only; not causal,
      so training and scoring only) (`ROUTER`).
    router_score: how logits become scores and gates (`routers.py`): 'softmax' (OpenMoE),
      'softmax_selected' (Mixtral) or 'sigmoid' (DeepSeek-V3) (`ROUTER_SCORE`).
    routed_scaling_factor: the gates are multiplied by it (DeepSeek-V2/V3; OpenMoE 1.0).
    num_expert_groups, topk_groups: group-limited routing (DeepSeek-V3): experts in
      num_expert_groups equal groups, top-k only within the topk_groups best; 0 turns it off.
    balance_loss: 'switch' (OpenMoE), 'sequence' (DeepSeek-V3's sequence-wise loss) or 'global'
      (the Switch loss over the global batch), times aux_loss_factor.
    num_shared_experts: always-on experts beside the routed ones, as one FFN of width
      shared_expert_mlp_dim (0: num_shared_experts * expert_mlp_dim) whose output is added to
      the routed experts' (DeepSeek-MoE, arXiv:2401.06066); 0 = none (OpenMoE).
    shared_expert_gate: scale the shared experts' output by sigmoid(x w) (Qwen2-MoE's
      `shared_expert_gate`).
    first_k_dense_layers, moe_layer_freq: DeepSeek's layer rule (`first_k_dense_replace`,
      `moe_layer_freq`): layer i is MoE iff i >= first_k_dense_layers and i % moe_layer_freq
      == 0. Both 0 (default): OpenMoE's rule from num_sparse_layers. With the DeepSeek rule,
      num_sparse_layers must equal the number of MoE layers it gives.
    expert_bias_update_rate: auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): a
      per-expert bias added to the scores for the choice of experts only, moved by this rate
      towards balance after every step (`training/expert_bias.py`); 0 = off (OpenMoE)
      (`EXPERT_BIAS_UPDATE_RATE`). Token choice only.
    expert_bias: the model holds that bias (parameter .../mlp/expert_bias float32[E]); set
      whenever expert_bias_update_rate > 0, and alone to keep a trained bias fixed (fine-tuning
      with rate 0) (`EXPERT_BIAS`).
    num_kv_heads: key/value heads of grouped-query attention (Ainslie et al. 2023): query head
      j reads key/value head j // (num_heads / num_kv_heads), as transformers' `repeat_kv`;
      0 = num_heads (OpenMoE) (`NUM_KV_HEADS`).
    qk_norm: RMSNorm on queries and keys before RoPE (parameters .../query_norm/scale,
      .../key_norm/scale): 'head' over each head's H values (Qwen3, OLMo-2-style per head),
      'projection' over the whole projection N*H (OLMoE `OlmoeAttention.q_norm`); 'none'
      (OpenMoE) (`QK_NORM`).
    attention_scale: the attention logits q.k are multiplied by it: 1.0 (OpenMoE folds
      1/sqrt(H) into the query initialiser) or head_dim**-0.5, today's families'
      (`ATTENTION_SCALE`).
    mlp_layout: 'openmoe' (wi_0 [D, 2F] split a, b -> a * silu(b) * (x wi_1), OpenMoE's
      three-projection FFN) or 'gated' (the gate / up / down layout of Llama and every family
      since: silu(x wi_0) * (x wi_1), wi_0 and wi_1 both [D, F]), for dense FFNs, experts and
      shared experts alike (`MLP_LAYOUT`).
    moe_extra_mlp: an MoE layer also has OpenMoE's extra dense FFN after the experts (True,
      OpenMoE); False for the families whose MoE layer is the experts alone (`MOE_EXTRA_MLP`).
    attention_impl: how softmax(q k^T) v is computed (`model/attention.py`, `ATTENTION_IMPL`):
      'dense' (OpenMoE's numerics: the [B, N, T, S] logits in the activation dtype), 'chunked'
      (blockwise online softmax in float32, any backend: memory linear in the length),
      'splash' (Pallas TPU splash attention), 'cudnn' (GPU flash attention through
      jax.nn.dot_product_attention) or 'auto' (docs/configuration.md: by backend and shape).
    attention_block: query and key block of 'chunked' and 'splash' (`ATTENTION_BLOCK`).
    expert_exchange: dropless/adaptive rows between expert shards (`EXPERT_EXCHANGE`): 'dense'
      (fixed chunks, one all_to_all), 'ragged' (jax.lax.ragged_all_to_all: only the rows that
      exist travel) or 'auto' (ragged on TPU and GPU, dense on CPU).
  """
  vocab_size: int = 512
  emb_dim: int = 32
  num_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 64
  expert_mlp_dim: int = 64
  num_layers: int = 2
  num_experts: int = 8
  num_sparse_layers: int = 1
  num_selected_experts: int = 2
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  group_size: int = 4096
  num_expert_replicas: int = 1
  renormalize_gates: bool = False
  no_drop: bool = False
  capacity_formula: str = "flaxformer"
  dispatch: str = "auto"
  capacity_mode: str = "fixed"
  capacity_order: str = "openmoe"
  grouped_matmul: str = "auto"
  ep_buffer_factor: float = 0.0
  aux_loss_factor: float = 0.01
  router_z_loss_factor: float = 1e-4
  z_loss: float = 1e-4
  dropout_rate: float = 0.0
  activation_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  rope_max_timescale: float = 1e4
  norm_eps: float = 1e-6
  scale: float = 0.1
  router_init_stddev: float = 2e-2
  position_buckets: int = 8
  remat_policy: str = "none"
  moe_float32_output: bool = True
  float32_norm: bool = False
  float32_attention_logits: bool = False
  router: str = "tokens_choose"
  router_score: str = "softmax"
  routed_scaling_factor: float = 1.0
  num_expert_groups: int = 0
  topk_groups: int = 0
  balance_loss: str = "switch"
  num_shared_experts: int = 0
  shared_expert_mlp_dim: int = 0
  shared_expert_gate: bool = False
  first_k_dense_layers: int = 0
  moe_layer_freq: int = 0
  expert_bias_update_rate: float = 0.0
  expert_bias: bool = False
  num_kv_heads: int = 0
  qk_norm: str = "none"
  attention_scale: float = 1.0
  mlp_layout: str = "openmoe"
  moe_extra_mlp: bool = True
  expert_group_score: str = "top2_sum"
  kv_lora_rank: int = 0
  q_lora_rank: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_original_max_len: int = 0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_attention_factor: float = 1.0
  attention_impl: str = "dense"
  attention_block: int = 512
  expert_exchange: str = "auto"

  def __post_init__(self):
    positive = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_layers",
                "group_size", "min_expert_capacity", "num_expert_replicas", "position_buckets")
    for name in positive:
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_experts < 0 or self.num_sparse_layers < 0:
      raise ValueError("ModelConfig.num_experts and num_sparse_layers must be >= 0, got "
                       f"{self.num_experts} and {self.num_sparse_layers}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.num_sparse_layers:
      if self.num_experts <= 0:
        raise ValueError("ModelConfig.num_experts must be positive when num_sparse_layers="
                         f"{self.num_sparse_layers}")
      if self.deepseek_layer_rule:
        rule = sum(self._deepseek_moe(i) for i in range(self.num_layers))
        if rule != self.num_sparse_layers:
          raise ValueError(f"ModelConfig.num_sparse_layers={self.num_sparse_layers} must be "
                           f"{rule}, the MoE layers of first_k_dense_layers="
                           f"{self.first_k_dense_layers} and moe_layer_freq="
                           f"{self.moe_layer_freq} in {self.num_layers} layers")
      elif self.num_layers % self.num_sparse_layers:
        raise ValueError(f"ModelConfig.num_sparse_layers={self.num_sparse_layers} must divide "
                         f"num_layers={self.num_layers}")
      if self.expert_mlp_dim <= 0:
        raise ValueError(f"ModelConfig.expert_mlp_dim must be positive, got {self.expert_mlp_dim}")
      if not 1 <= self.num_selected_experts <= self.num_experts:
        raise ValueError(f"ModelConfig.num_selected_experts={self.num_selected_experts} must be in "
                         f"[1, num_experts={self.num_experts}]")
      for name in ("train_capacity_factor", "eval_capacity_factor"):
        if getattr(self, name) <= 0:
          raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.dispatch not in DISPATCH_MODES:
      raise ValueError(f"ModelConfig.dispatch={self.dispatch!r} not in {DISPATCH_MODES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.capacity_formula not in CAPACITY_FORMULAS:
      raise ValueError(f"ModelConfig.capacity_formula={self.capacity_formula!r} not in "
                       f"{CAPACITY_FORMULAS}")
    for name, allowed in (("capacity_mode", CAPACITY_MODES), ("capacity_order", CAPACITY_ORDERS),
                          ("grouped_matmul", GROUPED_MATMULS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} not in {allowed}")
    for name, allowed in (("router", ROUTERS), ("router_score", ROUTER_SCORES),
                          ("balance_loss", BALANCE_LOSSES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} not in {allowed}")
    if not self.routed_scaling_factor > 0:
      raise ValueError("ModelConfig.routed_scaling_factor must be positive, got "
                       f"{self.routed_scaling_factor}")
    self._check_groups()
    if self.router == "experts_choose":
      if self.capacity_mode != "fixed":
        raise ValueError(f"ModelConfig.router='experts_choose' takes capacity_mode='fixed' (an "
                         f"expert's C tokens are its capacity), got {self.capacity_mode!r}")
      if self.num_expert_groups or self.router_score == "softmax_selected":
        raise ValueError("ModelConfig.router='experts_choose' chooses tokens, not experts: "
                         "num_expert_groups and router_score='softmax_selected' do not apply")
    for name in ("num_shared_experts", "shared_expert_mlp_dim", "first_k_dense_layers",
                 "moe_layer_freq"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not self.expert_bias_update_rate >= 0:
      raise ValueError("ModelConfig.expert_bias_update_rate must be >= 0 (0 turns the "
                       f"loss-free balancing off), got {self.expert_bias_update_rate}")
    if self.expert_bias_update_rate > 0 and not self.expert_bias:
      object.__setattr__(self, "expert_bias", True)  # the rate implies the bias
    if self.expert_bias and self.router == "experts_choose":
      raise ValueError("ModelConfig.expert_bias (EXPERT_BIAS_UPDATE_RATE > 0) balances the "
                       "experts tokens choose; under router='experts_choose' every expert "
                       "takes C tokens already")
    if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
      raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads="
                       f"{self.num_heads} (0: as many as num_heads)")
    for name, allowed in (("qk_norm", QK_NORMS), ("mlp_layout", MLP_LAYOUTS),
                          ("expert_group_score", EXPERT_GROUP_SCORES),
                          ("rope_scaling", ROPE_SCALINGS),
                          ("attention_impl", ATTENTION_IMPLS),
                          ("expert_exchange", EXPERT_EXCHANGES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} not in {allowed}")
    if not self.attention_scale > 0:
      raise ValueError(f"ModelConfig.attention_scale must be positive, got "
                       f"{self.attention_scale}")
    self._check_latent_attention()
    self._check_rope()
    if self.attention_impl in ("splash", "cudnn") and self.dropout_rate > 0:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} has no attention "
                       f"dropout: set DROPOUT_RATE=0 (got {self.dropout_rate}) or use "
                       "ATTENTION_IMPL='chunked' (or 'auto')")
    if self.attention_block <= 0 or self.attention_block % 8:
      raise ValueError(f"ModelConfig.attention_block must be a positive multiple of 8, got "
                       f"{self.attention_block}")
    if self.ep_buffer_factor < 0:
      raise ValueError(f"ModelConfig.ep_buffer_factor must be >= 0, got {self.ep_buffer_factor}")
    as_dtype(self.activation_dtype)
    as_dtype(self.param_dtype)

  def _check_groups(self):
    groups, top = self.num_expert_groups, self.topk_groups
    if groups < 0 or top < 0:
      raise ValueError(f"ModelConfig.num_expert_groups={groups} and topk_groups={top} must be "
                       ">= 0")
    if not groups:
      if top:
        raise ValueError(f"ModelConfig.topk_groups={top} needs num_expert_groups > 0")
      return
    if not self.num_sparse_layers:
      return
    if self.num_experts % groups:
      raise ValueError(f"ModelConfig.num_experts={self.num_experts} is not divisible by "
                       f"num_expert_groups={groups}")
    if not 1 <= top <= groups:
      raise ValueError(f"ModelConfig.topk_groups={top} must be in [1, num_expert_groups="
                       f"{groups}]")
    allowed = top * (self.num_experts // groups)
    if self.num_selected_experts > allowed:
      raise ValueError(f"ModelConfig.num_selected_experts={self.num_selected_experts} is more "
                       f"than the {allowed} experts of the topk_groups={top} groups of "
                       f"{self.num_experts // groups} it may choose from")

  def _check_latent_attention(self):
    for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not self.kv_lora_rank:
      for name in ("q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        if getattr(self, name):
          raise ValueError(f"ModelConfig.{name}={getattr(self, name)} is multi-head latent "
                           "attention's: it needs kv_lora_rank > 0")
      return
    rope = self.qk_rope_head_dim
    if not (0 < rope < self.head_dim and rope % 2 == 0):
      raise ValueError(f"ModelConfig.qk_rope_head_dim={rope} must be even and in (0, head_dim="
                       f"{self.head_dim}) under multi-head latent attention")
    if self.num_kv_heads not in (0, self.num_heads) or self.qk_norm != "none":
      raise ValueError("ModelConfig: multi-head latent attention (kv_lora_rank > 0) has one "
                       "key/value head per query head and no QK norm: num_kv_heads must be 0 "
                       "and qk_norm 'none'")

  def _check_rope(self):
    if self.rope_scaling == "none":
      if (self.rope_scaling_factor, self.rope_attention_factor) != (1.0, 1.0):
        raise ValueError("ModelConfig.rope_scaling_factor and rope_attention_factor need "
                         "rope_scaling='yarn'")
      return
    if not self.rope_scaling_factor >= 1.0 or self.rope_original_max_len <= 0:
      raise ValueError("ModelConfig.rope_scaling='yarn' needs rope_scaling_factor >= 1 and "
                       f"rope_original_max_len > 0, got {self.rope_scaling_factor} and "
                       f"{self.rope_original_max_len}")
    if not self.rope_attention_factor > 0 or not self.rope_beta_fast > self.rope_beta_slow > 0:
      raise ValueError("ModelConfig: YaRN needs rope_attention_factor > 0 and rope_beta_fast > "
                       f"rope_beta_slow > 0, got {self.rope_attention_factor}, "
                       f"{self.rope_beta_fast}, {self.rope_beta_slow}")

  @property
  def mla(self) -> bool:
    """Multi-head latent attention (kv_lora_rank > 0)."""
    return self.kv_lora_rank > 0

  @property
  def value_head_dim(self) -> int:
    """Width of each value head (v_head_dim, or head_dim when it is 0)."""
    return self.v_head_dim or self.head_dim

  @property
  def rope_dim(self) -> int:
    """How many of a query/key head's values RoPE rotates."""
    return self.qk_rope_head_dim if self.mla else self.head_dim

  @property
  def deepseek_layer_rule(self) -> bool:
    """True when first_k_dense_layers or moe_layer_freq choose the MoE layers."""
    return bool(self.first_k_dense_layers or self.moe_layer_freq)

  def _deepseek_moe(self, i: int) -> bool:
    return i >= self.first_k_dense_layers and i % max(self.moe_layer_freq, 1) == 0

  @property
  def moe_interval(self) -> Optional[int]:
    """OpenMoE's rule's interval; None for a dense model or under the DeepSeek rule."""
    if not self.num_sparse_layers or self.deepseek_layer_rule:
      return None
    return self.num_layers // self.num_sparse_layers

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when it is 0."""
    return self.num_kv_heads or self.num_heads

  @property
  def gate_width(self) -> int:
    """wi_0's output width per hidden unit: 2 in OpenMoE's layout (a and b), 1 when gated."""
    return 2 if self.mlp_layout == "openmoe" else 1

  @property
  def shared_width(self) -> int:
    """Hidden width of the shared experts' FFN (0 without shared experts)."""
    if not self.num_shared_experts:
      return 0
    return self.shared_expert_mlp_dim or self.num_shared_experts * self.expert_mlp_dim

  def is_moe_layer(self, i: int) -> bool:
    """flaxformer MIXED layout: layer i is sparse iff (i + 1) % interval == 0; or DeepSeek's
    rule (`deepseek_layer_rule`)."""
    if not self.num_sparse_layers:
      return False
    if self.deepseek_layer_rule:
      return self._deepseek_moe(i)
    return (i + 1) % self.moe_interval == 0

  @property
  def moe_layers(self) -> tuple:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def dtype(self):
    return as_dtype(self.activation_dtype)

  @property
  def weight_dtype(self):
    return as_dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_TAKES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_value(name: str, value: Any) -> Any:
  """`value` as ModelConfig field `name` holds it: text as typed on a command line
  (`capacity_mode=fixed`, `no_drop=true`, `eval_capacity_factor=2`) or a Python value, converted
  by the field's type. ValueError (naming the field and what it takes) otherwise."""
  types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  if name not in types:
    raise ValueError(f"{name!r} is not a ModelConfig field (fields: {', '.join(types)})")
  kind = types[name]
  if isinstance(value, str):
    text = value.strip()
    if kind is str:
      return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text
    try:
      if kind is bool and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
      if kind is int:
        return int(text)
      if kind is float:
        return float(text)
    except ValueError:
      pass
  elif isinstance(value, bool):
    if kind is bool:
      return value
  elif isinstance(value, int) and kind in (int, float):
    return kind(value)
  elif isinstance(value, float) and kind is float:
    return value
  raise ValueError(f"{name}={value!r}: must be {_TAKES[kind]}")


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
  """['FIELD=VALUE', ...] (`--model_override`) -> {field: typed value} (`field_value`)."""
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"bad override {item!r}: use FIELD=VALUE with a ModelConfig field")
    out[name.strip()] = field_value(name.strip(), value)
  return out


def overrides_text(overrides: Mapping[str, Any]) -> List[str]:
  """{field: value} -> ['FIELD=VALUE', ...] as a user types them (reports record these)."""
  return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
