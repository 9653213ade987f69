"""The one table between our flax parameter paths and the released OpenMoE Hugging Face keys.

Both `openmoe-export` and `openmoe-import` use `NAME_MAP` (ColossalAI `examples/language/openmoe/model/convert_openmoe_ckpt.py`), so the two directions
cannot drift apart. It also converts between our `ModelConfig` and the released `config.json`
fields (OrionZheng/openmoe-8b `config.json`). Only the standard library is imported here: the exporter must not pull in
torch, and the modelling code must not pull in JAX.
"""
import dataclasses
from typing import Iterator, NamedTuple

from openmoe_jax.data import special_tokens
from openmoe_jax.model import config as config_lib
from openmoe_jax.model import routing

# (scope, flax path template, HF key template, transpose). Scopes: 'global' once per model,
# 'layer' every layer, 'dense' layers without experts, 'moe' expert layers. `{i}` = layer.
# 2-D kernels are stored [in, out] by flax and [out, in] by torch.nn.Linear, hence the
# transposes; the 3-D expert tensors keep flax's layout in the port (no transpose).
NAME_MAP = (
    ("global", "token_embedder/embedding", "model.embed_tokens.weight", False),
    ("layer", "decoder/layers_{i}/pre_self_attention_layer_norm/scale",
     "model.layers.{i}.input_layernorm.weight", False),
    ("layer", "decoder/layers_{i}/self_attention/query/kernel",
     "model.layers.{i}.self_attn.q_proj.weight", True),
    ("layer", "decoder/layers_{i}/self_attention/key/kernel",
     "model.layers.{i}.self_attn.k_proj.weight", True),
    ("layer", "decoder/layers_{i}/self_attention/value/kernel",
     "model.layers.{i}.self_attn.v_proj.weight", True),
    ("layer", "decoder/layers_{i}/self_attention/out/kernel",
     "model.layers.{i}.self_attn.o_proj.weight", True),
    ("layer", "decoder/layers_{i}/pre_mlp_layer_norm/scale",
     "model.layers.{i}.post_attention_layernorm.weight", False),
    ("dense", "decoder/layers_{i}/mlp/wi_0/kernel", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("dense", "decoder/layers_{i}/mlp/wi_1/kernel", "model.layers.{i}.mlp.up_proj.weight", True),
    ("dense", "decoder/layers_{i}/mlp/wo/kernel", "model.layers.{i}.mlp.down_proj.weight", True),
    ("moe", "decoder/layers_{i}/mlp/router/router_weights/w/kernel",
     "model.layers.{i}.mlp.gate_weight", True),
    ("moe", "decoder/layers_{i}/mlp/expert/wi_0/kernel", "model.layers.{i}.mlp.experts.wi_gate",
     False),
    ("moe", "decoder/layers_{i}/mlp/expert/wi_1/kernel", "model.layers.{i}.mlp.experts.wi_up",
     False),
    ("moe", "decoder/layers_{i}/mlp/expert/wo/kernel", "model.layers.{i}.mlp.experts.wo", False),
    ("moe", "decoder/layers_{i}/pre_extra_mlp_layer_norm/scale",
     "model.layers.{i}.pre_extra_mlp_layernorm.weight", False),
    ("moe", "decoder/layers_{i}/extra_mlp/wi_0/kernel",
     "model.layers.{i}.extra_mlp.gate_proj.weight", True),
    ("moe", "decoder/layers_{i}/extra_mlp/wi_1/kernel",
     "model.layers.{i}.extra_mlp.up_proj.weight", True),
    ("moe", "decoder/layers_{i}/extra_mlp/wo/kernel",
     "model.layers.{i}.extra_mlp.down_proj.weight", True),
    ("global", "decoder/decoder_norm/scale", "model.norm.weight", False),
    ("global", "decoder/logits_dense/kernel", "lm_head.weight", True),
)


class Entry(NamedTuple):
  flax_path: tuple  # path in the params tree, e.g. ('decoder', 'layers_3', 'mlp', ...)
  hf_key: str
  transpose: bool


def entries(num_layers: int, is_moe_layer) -> Iterator[Entry]:
  """Every parameter of a model, in the released checkpoint's order (embedding, layers, head)."""
  def make(row, i=None):
    _, flax_t, hf_t, transpose = row
    fmt = {} if i is None else {"i": i}
    return Entry(tuple(flax_t.format(**fmt).split("/")), hf_t.format(**fmt), transpose)
  globals_ = [r for r in NAME_MAP if r[0] == "global"]
  yield make(globals_[0])
  for i in range(num_layers):
    scopes = ("layer", "moe" if is_moe_layer(i) else "dense")
    for row in NAME_MAP:
      if row[0] in scopes:
        yield make(row, i)
  for row in globals_[1:]:
    yield make(row)


def hf_shape(flax_shape, transpose: bool) -> tuple:
  return tuple(reversed(flax_shape)) if transpose else tuple(flax_shape)


def _no_drop(cfg) -> bool:
  """A dropless model computes every assignment: in the exported code, router_no_drop.
  ('adaptive' capacity has no counterpart there; it exports as fixed capacity.)"""
  return routing.never_drops(cfg)


def token_ids() -> dict:
  """The special token ids as Hugging Face configs name them."""
  return {"bos_token_id": special_tokens.BOS_ID, "eos_token_id": special_tokens.EOS_ID,
          "pad_token_id": special_tokens.PAD_ID}


# config.json keys <-> ModelConfig fields, read and written through these two tables (the keys
# with a rule of their own, head_dim, num_experts, moe_layer_interval, expert_intermediate_size,
# router_drop_tks / router_no_drop, are handled by both functions below). SIZE_KEYS are required
# on reading; ROUTING_KEYS default to ModelConfig's when absent (the released files lack ours).
SIZE_KEYS = {"vocab_size": "vocab_size", "hidden_size": "emb_dim",
             "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads"}
ROUTING_KEYS = {"router_topk": "num_selected_experts",
                "router_capacity_factor_train": "train_capacity_factor",
                "router_capacity_factor_eval": "eval_capacity_factor",
                "router_min_capacity": "min_expert_capacity",
                "router_aux_loss_factor": "aux_loss_factor",
                "router_z_loss_factor": "router_z_loss_factor",
                "rope_theta": "rope_max_timescale", "rms_norm_eps": "norm_eps",
                # Ours (absent from the released files).
                "router_group_size": "group_size", "router_capacity_formula": "capacity_formula",
                "router_renormalize_gates": "renormalize_gates",
                "router_score": "router_score", "routed_scaling_factor": "routed_scaling_factor",
                "router_num_expert_groups": "num_expert_groups",
                "router_topk_groups": "topk_groups", "router_balance_loss": "balance_loss",
                "moe_float32_output": "moe_float32_output", "rms_norm_float32": "float32_norm",
                "attention_float32_logits": "float32_attention_logits"}


def unexportable_designs(cfg) -> list:
  """The routing designs of `cfg` no Hugging Face layout we write holds (OpenMoE's nor the
  families'): expert choice, shared experts, the loss-free balancing bias."""
  out = []
  if cfg.router == "experts_choose":
    out.append("expert-choice routing (ROUTER='experts_choose')")
  if cfg.num_shared_experts:
    out.append(f"shared experts (NUM_SHARED_EXPERTS={cfg.num_shared_experts})")
  if cfg.expert_bias:
    out.append("the loss-free balancing bias (EXPERT_BIAS_UPDATE_RATE / EXPERT_BIAS)")
  return out


def unexportable_attention(cfg) -> list:
  """DeepSeek's attention, which only the DeepSeek layouts hold: multi-head latent attention
  and YaRN."""
  out = []
  if cfg.mla:
    out.append(f"multi-head latent attention (KV_LORA_RANK={cfg.kv_lora_rank})")
  if cfg.rope_scaling != "none":
    out.append(f"RoPE scaling (ROPE_SCALING={cfg.rope_scaling!r})")
  return out


def unexportable(cfg) -> list:
  """What of `cfg` the OpenMoE layout (its `modeling_openmoe.py` and weight names) cannot hold:
  expert choice, shared experts, the loss-free balancing bias, DeepSeek's layer rule and
  today's families' attention and FFN ([] when it can hold everything)."""
  out = unexportable_designs(cfg)
  if cfg.mlp_layout != "openmoe" or not cfg.moe_extra_mlp or cfg.qk_norm != "none" \
      or cfg.num_kv_heads not in (0, cfg.num_heads) or cfg.attention_scale != 1.0:
    out.append("today's families' attention and FFN (NUM_KV_HEADS, QK_NORM, ATTENTION_SCALE, "
               "MLP_LAYOUT, MOE_EXTRA_MLP)")
  out += unexportable_attention(cfg)
  if cfg.expert_group_score != "top2_sum":
    out.append(f"EXPERT_GROUP_SCORE={cfg.expert_group_score!r} (DeepSeek-V2's group score)")
  if cfg.deepseek_layer_rule:
    out.append(f"DeepSeek's layer rule (FIRST_K_DENSE_LAYERS={cfg.first_k_dense_layers}, "
               f"MOE_LAYER_FREQ={cfg.moe_layer_freq})")
  return out


def hf_config(cfg, torch_dtype: str = "float32") -> dict:
  """config.json of the released layout (OrionZheng/openmoe-8b `config.json`) for a ModelConfig, plus our routing fields.

  `label_smoothing` / `z_loss_factor` are the JAX pre-training values (0 and Z_LOSS), not the
  port's fine-tuning defaults. `model_type` stays "llama" as in the released files; `auto_map`
  points AutoConfig and AutoModelForCausalLM at the shipped `modeling_openmoe.py`.
  """
  interval = cfg.moe_interval
  return {
      "architectures": ["OpenMoeForCausalLM"],
      "auto_map": {"AutoConfig": "modeling_openmoe.OpenMoeConfig",
                   "AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"},
      "model_type": "llama",
      **{key: getattr(cfg, field) for key, field in SIZE_KEYS.items()},
      "num_key_value_heads": cfg.num_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "swiglu",
      "mlp_gated": True,
      "max_position_embeddings": 2048,
      "rope_scaling": None,
      "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": False,
      "attention_bias": False,
      "pretraining_tp": 1,
      "initializer_range": 0.02,
      "dropout_rate": cfg.dropout_rate,
      **token_ids(),
      "num_experts": cfg.num_experts if interval else 0,
      # A dense model gets an interval no layer index reaches, so no layer is sparse.
      "moe_layer_interval": interval or cfg.num_layers + 1,
      **{key: getattr(cfg, field) for key, field in ROUTING_KEYS.items()},
      "router_noisy_policy": None,
      "router_drop_tks": not _no_drop(cfg),
      "label_smoothing": 0.0,
      "z_loss_factor": cfg.z_loss,
      "enable_load_balance": False,
      "load_balance_tolerance": 0.1,
      "load_balance_beam_width": 8,
      "load_balance_group_swap_factor": 0.4,
      "enable_kernel": False,
      "enable_comm_overlap": False,
      "enable_hierarchical_alltoall": False,
      "expert_parallel": None,
      "torch_dtype": torch_dtype,
      "transformers_version": "4.34.0",
      "use_cache": True,
      # Ours (absent from the released files; readers default them).
      "expert_intermediate_size": cfg.expert_mlp_dim,
      "router_no_drop": _no_drop(cfg),
  }


REQUIRED_FIELDS = (*SIZE_KEYS, "num_experts", "moe_layer_interval")


def model_config_fields(hf: dict) -> dict:
  """ModelConfig keyword arguments from a released-layout config.json (ours or the originals).

  Raises:
    ValueError: not an OpenMoE config (missing fields, grouped-query attention, ...).
  """
  missing = [k for k in REQUIRED_FIELDS if k not in hf]
  if missing or "OpenMoeForCausalLM" not in hf.get("architectures", []):
    raise ValueError("not an OpenMoE Hugging Face config (needs architectures "
                     f"['OpenMoeForCausalLM'] and {', '.join(missing or REQUIRED_FIELDS)})")
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads", heads) != heads:
    raise ValueError("grouped-query attention (num_key_value_heads != num_attention_heads) is not "
                     "OpenMoE's")
  layers, interval = hf["num_hidden_layers"], hf["moe_layer_interval"]
  sparse = layers // interval if hf["num_experts"] and interval <= layers else 0
  fields = {field: hf[key] for key, field in SIZE_KEYS.items()}
  fields.update({
      "head_dim": hf.get("head_dim", hf["hidden_size"] // heads),
      "expert_mlp_dim": hf.get("expert_intermediate_size", hf["intermediate_size"]),
      "num_experts": hf["num_experts"] if sparse else 0, "num_sparse_layers": sparse})
  fields.update({field: hf[key] for key, field in ROUTING_KEYS.items()
                 if hf.get(key) is not None})
  if not sparse:
    fields["num_selected_experts"] = 2
  return fields


SHAPE_FIELDS = config_lib.SHAPE_FIELDS  # re-exported


def shape_mismatch(cfg_a, cfg_b) -> list:
  """Shape-defining fields on which two ModelConfigs differ, as 'name: a != b' strings."""
  a, b = dataclasses.asdict(cfg_a), dataclasses.asdict(cfg_b)
  return [f"{k}: {a[k]} != {b[k]}" for k in SHAPE_FIELDS if a[k] != b[k]]
