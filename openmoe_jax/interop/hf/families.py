"""Today's open MoE families in their own Hugging Face layouts: Mixtral, OLMoE and Qwen3-MoE.

One table per family between our flax parameter paths and the family's checkpoint keys, and
the two conversions between its `config.json` and our `ModelConfig`. Both `openmoe-import` and
`openmoe-export` read them, so the two directions cannot drift apart. The layouts and config
fields are transformers' own (`models/mixtral/modeling_mixtral.py`,
`models/olmoe/modeling_olmoe.py`, `models/qwen3_moe/modeling_qwen3_moe.py` and their
`configuration_*.py`), checked against those classes in tests/test_hf_families.py.

What each family is in our terms (docs/models.md):
  * every family: grouped-query attention (`num_kv_heads`), logits scaled by head_dim**-0.5
    (`attention_scale`), the gate / up / down FFN (`mlp_layout='gated'`), MoE layers without
    OpenMoE's extra FFN (`moe_extra_mlp=False`), dropless routing (their code drops nothing),
    no z-losses, untied embeddings;
  * mixtral: softmax over the top-k logits (`router_score='softmax_selected'`);
  * olmoe: RMSNorm over the whole q and k projections (`qk_norm='projection'`), softmax over
    all experts, renormalised over the top-k when `norm_topk_prob`;
  * qwen3_moe: RMSNorm over each head of q and k (`qk_norm='head'`), the same router as
    OLMoE's, dense layers by `mlp_only_layers` / `decoder_sparse_step`.
Like name_map.py, nothing here imports torch or builds arrays.
"""
import math
from typing import Iterator, NamedTuple, Optional

from openmoe_jax.interop.hf import name_map

FAMILIES = ("mixtral", "olmoe", "qwen3_moe")
QK_NORM = {"mixtral": "none", "olmoe": "projection", "qwen3_moe": "head"}  # what tells them apart
NOT_YET = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3"}
# The tokenizer files a Hugging Face folder may hold: `openmoe-import` keeps them in
# MODEL_DIR/hf_tokenizer, `openmoe-export` writes them back beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt")
HF_TOKENIZER_DIR = "hf_tokenizer"


class Tensor(NamedTuple):
  """One Hugging Face tensor: `expert` indexes the leading E axis of the flax array (the
  families store each expert's matrices as their own tensors); None = the whole array."""
  hf_key: str
  flax_path: tuple
  expert: Optional[int]
  transpose: bool


def _path(text: str) -> tuple:
  return tuple(text.split("/"))


def _moe_prefix(family: str, i: int) -> str:
  return f"model.layers.{i}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}"


_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down
_GATED_NAMES = ("gate_proj", "up_proj", "down_proj")


def openmoe_tensors(cfg) -> Iterator[Tensor]:
  """OpenMoE's own layout (`name_map.NAME_MAP`) as Tensors (its experts are 3-D tensors)."""
  for e in name_map.entries(cfg.num_layers, cfg.is_moe_layer):
    yield Tensor(e.hf_key, e.flax_path, None, e.transpose)


def tensors(family: str, cfg) -> Iterator[Tensor]:
  """Every tensor of `cfg` in `family`'s layout, in transformers' order (embedding, layers,
  final norm, head). Kernels are [in, out] in flax and [out, in] in torch.nn.Linear."""
  if family == "openmoe":
    yield from openmoe_tensors(cfg)
    return
  yield Tensor("model.embed_tokens.weight", _path("token_embedder/embedding"), None, False)
  for i in range(cfg.num_layers):
    flax = f"decoder/layers_{i}"
    hf = f"model.layers.{i}"
    yield Tensor(f"{hf}.input_layernorm.weight",
                 _path(f"{flax}/pre_self_attention_layer_norm/scale"), None, False)
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "o_proj")):
      yield Tensor(f"{hf}.self_attn.{theirs}.weight",
                   _path(f"{flax}/self_attention/{ours}/kernel"), None, True)
    if cfg.qk_norm != "none":
      for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
        yield Tensor(f"{hf}.self_attn.{theirs}.weight",
                     _path(f"{flax}/self_attention/{ours}/scale"), None, False)
    yield Tensor(f"{hf}.post_attention_layernorm.weight",
                 _path(f"{flax}/pre_mlp_layer_norm/scale"), None, False)
    if cfg.is_moe_layer(i):
      moe = _moe_prefix(family, i)
      yield Tensor(f"{moe}.gate.weight", _path(f"{flax}/mlp/router/router_weights/w/kernel"),
                   None, True)
      names = _EXPERT_NAMES.get(family, _GATED_NAMES)
      for e in range(cfg.num_experts):
        for ours, theirs in zip(("wi_0", "wi_1", "wo"), names):
          yield Tensor(f"{moe}.experts.{e}.{theirs}.weight",
                       _path(f"{flax}/mlp/expert/{ours}/kernel"), e, True)
    else:
      for ours, theirs in zip(("wi_0", "wi_1", "wo"), _GATED_NAMES):
        yield Tensor(f"{hf}.mlp.{theirs}.weight", _path(f"{flax}/mlp/{ours}/kernel"), None, True)
  yield Tensor("model.norm.weight", _path("decoder/decoder_norm/scale"), None, False)
  yield Tensor("lm_head.weight", _path("decoder/logits_dense/kernel"), None, True)


def hf_shape(flax_shape, t: Tensor) -> tuple:
  shape = tuple(flax_shape[1:] if t.expert is not None else flax_shape)
  return tuple(reversed(shape)) if t.transpose else shape


# --- config.json -> ModelConfig ------------------------------------------------------------

def family_of(hf: dict) -> str:
  """The family of a config.json by its `model_type` ('openmoe' for OpenMoE's own layout,
  whose released files say 'llama' with architectures ['OpenMoeForCausalLM']).

  Raises:
    ValueError: a model type we do not read, named, with the ones we do.
  """
  if "OpenMoeForCausalLM" in (hf.get("architectures") or []):
    return "openmoe"
  kind = hf.get("model_type")
  if kind in FAMILIES:
    return kind
  if kind in NOT_YET:
    raise ValueError(f"model_type {kind!r} ({NOT_YET[kind]}): multi-head latent attention is "
                     "not in openmoe-import yet; it reads openmoe, " + ", ".join(FAMILIES))
  raise ValueError(f"model_type {kind!r} is not an OpenMoE config (architectures "
                   "['OpenMoeForCausalLM']) nor a family openmoe-import reads ("
                   f"{', '.join(FAMILIES)})")


def _rope_theta(hf: dict) -> float:
  """RoPE theta from transformers 5's `rope_parameters` or the older `rope_theta` /
  `rope_scaling`; only the default (unscaled) RoPE is read."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise ValueError(f"rope type {kind!r} (rope scaling) is not supported; only the default "
                     "RoPE is")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise ValueError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
  return float(theta)


def _refuse(hf: dict, key: str, ok, what: str) -> None:
  if key in hf and not ok(hf[key]):
    raise ValueError(f"{key}={hf[key]!r} ({what}) is not supported")


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_experts_per_tok")
# transformers' defaults for keys a released config.json may leave out (OLMoE-1B-7B-0924's has
# no rms_norm_eps): `configuration_mixtral.py`, `configuration_olmoe.py`,
# `configuration_qwen3_moe.py`.
_DEFAULT_EPS = {"mixtral": 1e-5, "olmoe": 1e-5, "qwen3_moe": 1e-6}


def model_config_fields(hf: dict) -> dict:
  """ModelConfig keyword arguments from a Mixtral, OLMoE or Qwen3-MoE config.json.

  Raises:
    ValueError: a field missing, or a feature of the family we do not build (named).
  """
  family = family_of(hf)
  # transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts` (attribute_map).
  experts_key = next((k for k in ("num_local_experts", "num_experts") if k in hf),
                     "num_local_experts" if family == "mixtral" else "num_experts")
  missing = [k for k in (*_REQUIRED, experts_key) if k not in hf]
  if missing:
    raise ValueError(f"{family} config.json lacks {', '.join(missing)}")
  _refuse(hf, "hidden_act", lambda v: v == "silu", "an FFN activation other than silu")
  _refuse(hf, "tie_word_embeddings", lambda v: not v, "tied input and output embeddings")
  _refuse(hf, "attention_bias", lambda v: not v, "biases in the attention projections")
  _refuse(hf, "clip_qkv", lambda v: v is None, "OLMoE's q/k/v clipping")
  _refuse(hf, "router_jitter_noise", lambda v: not v, "Mixtral's router jitter")
  _refuse(hf, "sliding_window", lambda v: v is None or not hf.get("use_sliding_window", True),
          "sliding-window attention")
  _refuse(hf, "use_sliding_window", lambda v: not v, "sliding-window attention")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  layers = hf["num_hidden_layers"]
  fields = {
      "vocab_size": hf["vocab_size"], "emb_dim": hf["hidden_size"], "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
      "num_layers": layers, "mlp_dim": hf["intermediate_size"],
      "expert_mlp_dim": hf.get("moe_intermediate_size") or hf["intermediate_size"],
      "num_experts": hf[experts_key], "num_selected_experts": hf["num_experts_per_tok"],
      "norm_eps": float(hf.get("rms_norm_eps") or _DEFAULT_EPS[family]), "rope_max_timescale": _rope_theta(hf),
      "attention_scale": head_dim**-0.5, "mlp_layout": "gated", "moe_extra_mlp": False,
      "qk_norm": QK_NORM[family],
      "capacity_mode": "dropless", "z_loss": 0.0,
      "router_z_loss_factor": float(hf.get("router_z_loss_coef", 0.0)),
      "aux_loss_factor": float(hf.get("router_aux_loss_coef", 0.0)),
      "moe_float32_output": False, "float32_attention_logits": True,
  }
  if family == "mixtral":
    fields["router_score"] = "softmax_selected"
  else:
    fields.update(router_score="softmax", renormalize_gates=bool(hf.get("norm_topk_prob")))
  fields.update(_layer_rule(hf, family, layers))
  return fields


def _layer_rule(hf: dict, family: str, layers: int) -> dict:
  """Which layers are MoE: all (Mixtral, OLMoE); Qwen3-MoE's `mlp_only_layers` and
  `decoder_sparse_step` (layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0)
  as one of our two rules."""
  if family != "qwen3_moe":
    return {"num_sparse_layers": layers}
  dense = sorted(hf.get("mlp_only_layers") or [])
  step = int(hf.get("decoder_sparse_step") or 1)
  if not dense and layers % step == 0:
    return {"num_sparse_layers": layers // step}
  if step == 1 and dense == list(range(len(dense))) and len(dense) < layers:
    return {"num_sparse_layers": layers - len(dense), "first_k_dense_layers": len(dense),
            "moe_layer_freq": 1}
  raise ValueError(f"mlp_only_layers={dense} with decoder_sparse_step={step} is not supported: "
                   "dense layers must be the first ones (step 1) or every step-th layer")


# --- ModelConfig -> config.json -----------------------------------------------------------

def infer_family(cfg) -> Optional[str]:
  """The family whose layout `cfg` is built like (None: OpenMoE's own, or no family's)."""
  if cfg.mlp_layout != "gated" or cfg.moe_extra_mlp:
    return None
  return {norm: family for family, norm in QK_NORM.items()}[cfg.qk_norm]


def unexportable(cfg, family: str) -> list:
  """What of `cfg` the family's layout (transformers' modelling code) cannot hold ([] when
  it holds everything)."""
  out = name_map.unexportable_designs(cfg)
  if cfg.num_expert_groups:
    out.append(f"group-limited routing (NUM_EXPERT_GROUPS={cfg.num_expert_groups})")
  if cfg.routed_scaling_factor != 1.0:
    out.append(f"a routed scaling factor (ROUTED_SCALING_FACTOR={cfg.routed_scaling_factor})")
  if cfg.mlp_layout != "gated":
    out.append(f"OpenMoE's FFN layout (MLP_LAYOUT={cfg.mlp_layout!r}; it needs 'gated')")
  if cfg.moe_extra_mlp and cfg.num_sparse_layers:
    out.append("OpenMoE's extra FFN in MoE layers (MOE_EXTRA_MLP=True)")
  want_norm = QK_NORM[family]
  if cfg.qk_norm != want_norm:
    out.append(f"QK_NORM={cfg.qk_norm!r} (it has {want_norm!r})")
  if not math.isclose(cfg.attention_scale, cfg.head_dim**-0.5, rel_tol=1e-6):
    out.append(f"ATTENTION_SCALE={cfg.attention_scale} (it scales by head_dim**-0.5 = "
               f"{cfg.head_dim**-0.5:.8g})")
  if cfg.router_score == "sigmoid":
    out.append("sigmoid router scores (ROUTER_SCORE='sigmoid')")
  # softmax over the selected logits == the softmax renormalised over them (norm_topk_prob)
  if family == "mixtral" and cfg.router_score == "softmax" and not cfg.renormalize_gates:
    out.append("gates that are not renormalised over the selected experts (Mixtral's are)")
  if family != "qwen3_moe" and cfg.moe_layers != tuple(range(cfg.num_layers)):
    out.append(f"dense layers (MoE layers {list(cfg.moe_layers)} of {cfg.num_layers}; every "
               "layer of it is MoE)")
  return out


def hf_config(cfg, family: str, torch_dtype: str = "float32") -> dict:
  """config.json of `family` for a ModelConfig (`unexportable(cfg, family)` must be [])."""
  out = {
      "architectures": [{"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
                         "qwen3_moe": "Qwen3MoeForCausalLM"}[family]],
      "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
      "intermediate_size": cfg.mlp_dim if family == "qwen3_moe" else cfg.expert_mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "num_experts_per_tok": cfg.num_selected_experts,
      "rope_theta": cfg.rope_max_timescale,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_max_timescale},
      "router_aux_loss_coef": cfg.aux_loss_factor, "tie_word_embeddings": False,
      "max_position_embeddings": 4096, "attention_dropout": 0.0, "use_cache": True,
      "dtype": torch_dtype, "torch_dtype": torch_dtype,
  }
  if family == "mixtral":
    out.update(num_local_experts=cfg.num_experts, sliding_window=None, router_jitter_noise=0.0)
  else:
    out.update(num_experts=cfg.num_experts, attention_bias=False,
               norm_topk_prob=cfg.router_score == "softmax_selected" or cfg.renormalize_gates)
  if family == "olmoe":
    out.update(clip_qkv=None, router_z_loss_coef=cfg.router_z_loss_factor)
  if family == "qwen3_moe":
    moe = set(cfg.moe_layers)
    out.update(moe_intermediate_size=cfg.expert_mlp_dim, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe],
               use_sliding_window=False, sliding_window=None)
  return out
