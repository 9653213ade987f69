"""OpenMoE in PyTorch, computing exactly what openmoe_jax's Flax model computes.

Self-contained (torch + transformers only) so it ships inside an exported folder and loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Parameter names are the
released OpenMoE checkpoints' (OrionZheng/openmoe-*), so those load too, without ColossalAI.

Model math (XueFuzhao/flaxformer `architectures/moe/moe_architecture.py`, `components/`): RMSNorm (eps 1e-6, normalised in float32), attention without 1/sqrt(head_dim)
(folded into the trained query kernel), half-rotation RoPE over the full head_dim with explicit
positions, three-projection FFN wo((x W_a) * silu(x W_b) * (x W_up)) where gate_proj = [W_a; W_b],
MoE every `moe_layer_interval` layers followed by a sequential extra dense FFN, untied lm_head.
Casts as flaxformer's in the model's dtype (e.g. bfloat16): the norm casts its normalised value,
then scales in that dtype (`rms_norm_float32` scales in float32); attention logits and softmax in
that dtype (`attention_float32_logits`); the MoE output is float32 (the router's combine weights,
`moe_float32_output`), so the residual stream is float32 from the first MoE layer on.

Routing (XueFuzhao/flaxformer `architectures/moe/routing.py`): float32 router, softmax over all experts then top-k without renormalising,
first choices served before second choices, left to right, in groups of the flattened tokens of
ONE forward call, zero-padded first (rows or columns, flaxformer `moe_layers._maybe_pad`) to a
multiple of E tokens, at least E groups (`_num_groups`); padding tokens are routed too. Capacity per `router_capacity_formula`: 'flaxformer' (default, ours)
max(round(cf*G/E), min) or 'colossalai' (the released port) floor(k*cf*G/E) rounded up to even,
i.e. twice as many slots; cf = router_capacity_factor_train in train() mode, _eval otherwise.
`router_no_drop=True` gives every expert G slots. With a KV cache each decoding step routes its
own (padded) tokens only, so cached decoding equals the JAX model run on the whole prefix only when no
assignment is dropped (no_drop) -- capacity routing is not causal.

BOS is the pad id 0 at position 0 (OpenMoE/t5x convention). Hugging Face's generate() derives
`attention_mask = input_ids != pad_token_id` when none is passed, which would hide that BOS, so
column 0 is always attendable (as in the port); for left-padded batches pass an attention_mask
whose BOS columns are 1.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

_MASK_BIAS = -1e10
# transformers >= 5.x renamed `past_key_values` to `cache` (inputs and outputs); accept both.
_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
                else "past_key_values")


class OpenMoeConfig(PretrainedConfig):
  """The released OpenMoE config.json fields (huggingface.co/OrionZheng/openmoe-8b `config.json`) plus our routing fields."""
  model_type = "openmoe"

  def __init__(self, vocab_size=256384, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=24, num_attention_heads=24, num_key_value_heads=None,
               head_dim=128, hidden_act="swiglu", max_position_embeddings=2048, rope_theta=1e4,
               rms_norm_eps=1e-6, num_experts=32, moe_layer_interval=6, router_topk=2,
               router_capacity_factor_train=1.25, router_capacity_factor_eval=2.0,
               router_min_capacity=4, router_capacity_formula="flaxformer", router_no_drop=False,
               router_group_size=4096, router_renormalize_gates=False, router_score="softmax",
               routed_scaling_factor=1.0, router_num_expert_groups=0, router_topk_groups=0,
               router_balance_loss="switch", expert_intermediate_size=None, initializer_range=0.02, use_cache=True,
               moe_float32_output=True, rms_norm_float32=False, attention_float32_logits=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
               **kwargs):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_key_value_heads or num_attention_heads
    self.head_dim = head_dim
    self.hidden_act = hidden_act
    self.max_position_embeddings = max_position_embeddings
    self.rope_theta = rope_theta
    self.rms_norm_eps = rms_norm_eps
    self.num_experts = num_experts
    self.moe_layer_interval = moe_layer_interval
    self.router_topk = router_topk
    self.router_capacity_factor_train = router_capacity_factor_train
    self.router_capacity_factor_eval = router_capacity_factor_eval
    self.router_min_capacity = router_min_capacity
    if router_capacity_formula not in ("flaxformer", "colossalai"):
      raise ValueError(f"router_capacity_formula={router_capacity_formula!r}: use 'flaxformer' "
                       "or 'colossalai'")
    self.router_capacity_formula = router_capacity_formula
    self.router_no_drop = router_no_drop
    self.router_group_size = router_group_size
    self.router_renormalize_gates = router_renormalize_gates
    if router_score not in ("softmax", "softmax_selected", "sigmoid"):
      raise ValueError(f"router_score={router_score!r}: use 'softmax', 'softmax_selected' or "
                       "'sigmoid'")
    self.router_score = router_score
    self.routed_scaling_factor = routed_scaling_factor
    self.router_num_expert_groups = router_num_expert_groups
    self.router_topk_groups = router_topk_groups
    self.router_balance_loss = router_balance_loss  # training only; kept for the round trip
    self.moe_float32_output = moe_float32_output
    self.rms_norm_float32 = rms_norm_float32
    self.attention_float32_logits = attention_float32_logits
    self.expert_intermediate_size = expert_intermediate_size or intermediate_size
    self.initializer_range = initializer_range
    self.use_cache = use_cache
    # Released field, always null; transformers 5 warns on the legacy name, so it is dropped.
    kwargs.pop("rope_scaling", None)
    super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

  def is_moe_layer(self, i: int) -> bool:
    return bool(self.num_experts) and (i + 1) % self.moe_layer_interval == 0


def as_openmoe_config(config):
  """An OpenMoeConfig from any config carrying the OpenMoE fields: the released folders'
  config.json has model_type 'llama' and no AutoConfig entry, so transformers builds a
  LlamaConfig (its extra fields kept as attributes); our defaults fill the rest."""
  if isinstance(config, OpenMoeConfig):
    return config
  fields = config.to_dict()
  fields.pop("model_type", None)
  return OpenMoeConfig(**fields)


class OpenMoeRMSNorm(nn.Module):
  """Output in the weight's (the model's) dtype, whatever the input's (flaxformer T5LayerNorm)."""

  def __init__(self, dim, eps, float32_scale=False):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps
    self.float32_scale = float32_scale

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    dtype = self.weight.dtype
    if self.float32_scale:
      return (y * self.weight.float()).to(dtype)
    return y.to(dtype) * self.weight


def _rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([-x2, x1], dim=-1)


def _apply_rope(x, positions, theta):
  """x: [B, N, T, H]; positions: long[B, T]. Half rotation over the full head dim."""
  h = x.shape[-1]
  timescale = theta ** (2 * torch.arange(h // 2, dtype=torch.float32, device=x.device) / h)
  angle = positions.float()[..., None] / timescale
  angle = torch.cat([angle, angle], dim=-1)[:, None]
  return x * torch.cos(angle).to(x.dtype) + _rotate_half(x) * torch.sin(angle).to(x.dtype)


class OpenMoeAttention(nn.Module):
  def __init__(self, config, layer_idx):
    super().__init__()
    self.layer_idx = layer_idx
    self.n, self.h = config.num_attention_heads, config.head_dim
    self.theta = config.rope_theta
    self.float32_logits = config.attention_float32_logits
    d, joined = config.hidden_size, self.n * self.h
    self.q_proj = nn.Linear(d, joined, bias=False)
    self.k_proj = nn.Linear(d, joined, bias=False)
    self.v_proj = nn.Linear(d, joined, bias=False)
    self.o_proj = nn.Linear(joined, d, bias=False)

  def forward(self, x, positions, key_ok, cache):
    b, t, _ = x.shape
    split = lambda y: y.view(b, t, self.n, self.h).transpose(1, 2)
    q = _apply_rope(split(self.q_proj(x)), positions, self.theta)
    k = _apply_rope(split(self.k_proj(x)), positions, self.theta)
    v = split(self.v_proj(x))
    if cache is not None:
      k, v = cache.update(k, v, self.layer_idx)
    # No 1/sqrt(head_dim): the trained query kernel already contains it (flaxformer).
    if self.float32_logits:
      q, k = q.float(), k.float()
    logits = torch.matmul(q, k.transpose(-1, -2))
    logits = logits.masked_fill(~key_ok, _MASK_BIAS)
    weights = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, self.n * self.h)
    return self.o_proj(out)


def _gated(h0, h1):
  """OpenMoE's ('swiglu', 'linear'): first half of gate_proj * silu(second half) * up_proj."""
  a, g = h0.chunk(2, dim=-1)
  return a * F.silu(g) * h1


class OpenMoeMLP(nn.Module):
  def __init__(self, d, f):
    super().__init__()
    self.gate_proj = nn.Linear(d, 2 * f, bias=False)
    self.up_proj = nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.down_proj(_gated(self.gate_proj(x), self.up_proj(x)))


class OpenMoeExperts(nn.Module):
  """E three-projection FFNs stored as the port does: wi_gate [E,d,2f], wi_up [E,d,f], wo [E,f,d]."""

  def __init__(self, e, d, f):
    super().__init__()
    self.wi_gate = nn.Parameter(torch.empty(e, d, 2 * f))
    self.wi_up = nn.Parameter(torch.empty(e, d, f))
    self.wo = nn.Parameter(torch.empty(e, f, d))

  def forward(self, x, e):
    return _gated(x @ self.wi_gate[e], x @ self.wi_up[e]) @ self.wo[e]


def num_groups(tokens, group_size, multiple):
  """flaxformer's group count: smallest n >= tokens // group_size dividing tokens, a multiple of
  E (`tokens` is a multiple of E after `pad_tokens`, so n <= tokens exists)."""
  n = max(tokens // group_size, multiple)
  while n < tokens and not (tokens % n == 0 and n % multiple == 0):
    n += 1
  return n


def pad_tokens(x, multiple):
  """flaxformer `_maybe_pad`: zero rows or zero columns of x [B, T, D] (the fewer padding tokens,
  columns on a tie) so that B * T is a multiple of `multiple`."""
  b, t = x.shape[:2]
  if (b * t) % multiple == 0:
    return x
  rows = next(r for r in range(1, multiple + 1) if ((b + r) * t) % multiple == 0)
  cols = next(c for c in range(1, multiple + 1) if (b * (t + c)) % multiple == 0)
  if cols * b > rows * t:
    return F.pad(x, (0, 0, 0, 0, 0, rows))
  return F.pad(x, (0, 0, 0, cols))


def expert_capacity(config, group, training):
  """Slots per expert and group (see the module docstring)."""
  e, k = config.num_experts, config.router_topk
  if config.router_no_drop:
    return group
  cf = config.router_capacity_factor_train if training else config.router_capacity_factor_eval
  if config.router_capacity_formula == "flaxformer":
    cap = int(round(cf * group / e))
  else:
    cap = math.floor(k * cf * group / e)
    cap += cap % 2
  return max(cap, config.router_min_capacity)


def route(logits, cfg):
  """Router logits [T, E] (float32) -> (gates, experts) [T, K], best first, as openmoe_jax's
  `model/routers.py`: softmax over all experts (OpenMoE), over the selected logits
  ('softmax_selected') or sigmoid scores; group-limited choice; gates optionally renormalised,
  then scaled by routed_scaling_factor."""
  k, e = cfg.router_topk, logits.shape[-1]
  kind = getattr(cfg, "router_score", "softmax")
  scores = torch.sigmoid(logits) if kind == "sigmoid" else torch.softmax(logits, dim=-1)
  choice = scores
  groups = getattr(cfg, "router_num_expert_groups", 0)
  if groups:
    size = e // groups
    best = choice.view(-1, groups, size).topk(min(2, size), dim=-1).values.sum(-1)
    top = best.topk(cfg.router_topk_groups, dim=-1).indices
    allowed = torch.zeros_like(best, dtype=torch.bool).scatter(1, top, True)
    choice = choice.masked_fill(~allowed.repeat_interleave(size, dim=-1), float("-inf"))
  index = torch.topk(choice, k, dim=-1).indices
  gates = scores.gather(-1, index)
  if kind == "softmax_selected":
    gates = torch.softmax(logits.gather(-1, index), dim=-1)
  elif cfg.router_renormalize_gates:
    gates = gates / (gates.sum(-1, keepdim=True) + (1e-20 if kind == "sigmoid" else 0.0))
  scale = getattr(cfg, "routed_scaling_factor", 1.0)
  return (gates * scale if scale != 1.0 else gates), index


class OpenMoeSparseMLP(nn.Module):
  """Router (`gate_weight` [E, d], float32) + capacity-limited top-k dispatch to the experts."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    e, d = config.num_experts, config.hidden_size
    self.gate_weight = nn.Parameter(torch.empty(e, d))
    self.experts = OpenMoeExperts(e, d, config.expert_intermediate_size)

  def forward(self, x):
    cfg = self.config
    b, t, d = x.shape
    e, k = cfg.num_experts, cfg.router_topk
    padded = pad_tokens(x, e)
    rows, cols = padded.shape[:2]
    tokens = padded.reshape(-1, d)
    n = num_groups(rows * cols, cfg.router_group_size, e)
    g = rows * cols // n
    gates, index = route(tokens.float() @ self.gate_weight.float().t(), cfg)  # [T, K]
    # Priority: within each group all first choices (left to right), then all second choices.
    order = index.view(n, g, k).transpose(1, 2).reshape(n, k * g)
    one_hot = F.one_hot(order, e)
    position = ((one_hot.cumsum(1) - 1) * one_hot).sum(-1)
    position = position.view(n, k, g).transpose(1, 2).reshape(-1, k)
    kept = position < expert_capacity(cfg, g, self.training)
    weights = torch.where(kept, gates, torch.zeros_like(gates))
    out = torch.zeros(rows * cols, d, dtype=torch.float32, device=x.device)
    for expert in range(e):
      tok, slot = torch.nonzero((index == expert) & kept, as_tuple=True)
      if tok.numel():
        y = self.experts(tokens[tok], expert)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    out = out.view(rows, cols, d)[:b, :t]
    return out if cfg.moe_float32_output else out.to(x.dtype)


class OpenMoeDecoderLayer(nn.Module):
  def __init__(self, config, layer_idx):
    super().__init__()
    d, eps, f32 = config.hidden_size, config.rms_norm_eps, config.rms_norm_float32
    self.moe = config.is_moe_layer(layer_idx)
    self.input_layernorm = OpenMoeRMSNorm(d, eps, f32)
    self.self_attn = OpenMoeAttention(config, layer_idx)
    self.post_attention_layernorm = OpenMoeRMSNorm(d, eps, f32)
    if self.moe:
      self.mlp = OpenMoeSparseMLP(config)
      self.pre_extra_mlp_layernorm = OpenMoeRMSNorm(d, eps, f32)
      self.extra_mlp = OpenMoeMLP(d, config.intermediate_size)
    else:
      self.mlp = OpenMoeMLP(d, config.intermediate_size)

  def forward(self, h, positions, key_ok, keep, cache):
    h = h + self.self_attn(self.input_layernorm(h) * keep, positions, key_ok, cache)
    h = h + self.mlp(self.post_attention_layernorm(h) * keep)
    if self.moe:  # the dense extra FFN runs after the experts, with its own norm (ST-MoE)
      h = h + self.extra_mlp(self.pre_extra_mlp_layernorm(h) * keep)
    return h


class OpenMoePreTrainedModel(PreTrainedModel):
  config_class = OpenMoeConfig
  base_model_prefix = "model"
  _no_split_modules = ["OpenMoeDecoderLayer"]
  _supports_cache_class = True

  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=std)
    elif isinstance(module, OpenMoeSparseMLP):
      nn.init.normal_(module.gate_weight, std=std)
    elif isinstance(module, OpenMoeExperts):
      for w in (module.wi_gate, module.wi_up, module.wo):
        nn.init.normal_(w, std=std)
    elif isinstance(module, OpenMoeRMSNorm):
      nn.init.ones_(module.weight)


class OpenMoeModel(OpenMoePreTrainedModel):
  def __init__(self, config):
    config = as_openmoe_config(config)
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(OpenMoeDecoderLayer(config, i)
                                for i in range(config.num_hidden_layers))
    self.norm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_float32)
    self.post_init()

  def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
    b, t = input_ids.shape
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache(config=self.config)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    positions = (past + torch.arange(t, device=input_ids.device))[None].expand(b, t)
    total = past + t
    key_ok = torch.ones(b, total, dtype=torch.bool, device=input_ids.device)
    if attention_mask is not None:
      key_ok = attention_mask[:, -total:].bool().clone()
      key_ok[:, 0] = True  # BOS = pad id 0 at column 0 (see the module docstring)
    causal = torch.arange(total, device=input_ids.device)[None] <= positions[0][:, None]
    mask = (causal[None] & key_ok[:, None, :])[:, None]  # [B, 1, T, total]
    # Padding tokens' normalised activations are zeroed, as flaxformer's decoder logit mask does.
    keep = key_ok[:, -t:, None].to(self.embed_tokens.weight.dtype)
    h = self.embed_tokens(input_ids)
    for layer in self.layers:
      h = layer(h, positions, mask, keep, past_key_values)
    # flaxformer DecoderOnly multiplies the final activations by the logit mask.
    return self.norm(h) * keep, past_key_values


class OpenMoeForCausalLM(OpenMoePreTrainedModel, GenerationMixin):
  def __init__(self, config):
    config = as_openmoe_config(config)
    super().__init__(config)
    self.model = OpenMoeModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def get_output_embeddings(self):
    return self.lm_head

  def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
              cache: Optional[Cache] = None, labels: Optional[torch.LongTensor] = None,
              use_cache: Optional[bool] = None, past_key_values: Optional[Cache] = None,
              **kwargs):
    """Logits float32 [B, T, V] and the KV cache (DynamicCache); `labels` (HF convention: shifted inside, -100 ignored) give the
    mean next-token cross-entropy (no z-loss or router losses)."""
    use_cache = self.config.use_cache if use_cache is None else use_cache
    cache = cache if cache is not None else past_key_values
    h, cache = self.model(input_ids, attention_mask, cache, use_cache)
    logits = F.linear(h.float(), self.lm_head.weight.float())  # float32 head, as in JAX
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  **{_CACHE_FIELD: cache if use_cache else None})
