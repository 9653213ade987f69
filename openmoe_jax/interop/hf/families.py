"""Today's open MoE families in their own Hugging Face layouts: Mixtral, OLMoE, Qwen3-MoE,
DeepSeek-V2 and DeepSeek-V3.

One table per family between our flax parameter paths and the family's checkpoint keys, and
the two conversions between its `config.json` and our `ModelConfig`. Both `openmoe-import` and
`openmoe-export` read them, so the two directions cannot drift apart. The layouts and config
fields are transformers' own (`models/mixtral/modeling_mixtral.py`,
`models/olmoe/modeling_olmoe.py`, `models/qwen3_moe/modeling_qwen3_moe.py`,
`models/deepseek_v2/modeling_deepseek_v2.py`, `models/deepseek_v3/modeling_deepseek_v3.py` and
their `configuration_*.py`), checked against those classes in tests/test_hf_families.py and
tests/test_hf_deepseek.py.

What each family is in our terms (docs/models.md):
  * every family: grouped-query attention (`num_kv_heads`), logits scaled by head_dim**-0.5
    (`attention_scale`), the gate / up / down FFN (`mlp_layout='gated'`), MoE layers without
    OpenMoE's extra FFN (`moe_extra_mlp=False`), dropless routing (their code drops nothing),
    no z-losses, untied embeddings;
  * mixtral: softmax over the top-k logits (`router_score='softmax_selected'`);
  * olmoe: RMSNorm over the whole q and k projections (`qk_norm='projection'`), softmax over
    all experts, renormalised over the top-k when `norm_topk_prob`;
  * qwen3_moe: RMSNorm over each head of q and k (`qk_norm='head'`), the same router as
    OLMoE's, dense layers by `mlp_only_layers` / `decoder_sparse_step`;
  * deepseek_v2 / deepseek_v3: multi-head latent attention (`kv_lora_rank`, `mla.py`) with
    YaRN (`rope_scaling`), shared experts, dense first layers (`first_k_dense_replace`), gates
    times `routed_scaling_factor`; V2 a softmax router, group-limited by each group's best
    expert (`topk_method='group_limited_greedy'`, `expert_group_score='max'`); V3 a sigmoid
    router, renormalised (`norm_topk_prob`), group-limited by each group's two best, with the
    loss-free balancing bias `e_score_correction_bias` (our `expert_bias`). DeepSeek-V3's
    multi-token-prediction layers (`num_nextn_predict_layers`; transformers skips them too)
    are not imported, and FP8 checkpoints (`quantization_config`) are refused: convert them to
    bfloat16 first (DeepSeek's `inference/fp8_cast_bf16.py`). The rotary rows of their
    checkpoints are interleaved; the import reorders them (`rope.interleaved_to_half`).
Like name_map.py, nothing here imports torch or builds arrays.
"""
import math
from typing import Iterator, NamedTuple, Optional

from openmoe_jax.interop.hf import name_map
from openmoe_jax.model import rope

DEEPSEEK = ("deepseek_v2", "deepseek_v3")
FAMILIES = ("mixtral", "olmoe", "qwen3_moe", *DEEPSEEK)
# What tells the standard-attention families apart (DeepSeek's: latent attention and router).
QK_NORM = {"mixtral": "none", "olmoe": "projection", "qwen3_moe": "head"}
# The tokenizer files a Hugging Face folder may hold: `openmoe-import` keeps them in
# MODEL_DIR/hf_tokenizer, `openmoe-export` writes them back beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt")
HF_TOKENIZER_DIR = "hf_tokenizer"


class Tensor(NamedTuple):
  """One Hugging Face tensor: `expert` indexes the leading E axis of the flax array (the
  families store each expert's matrices as their own tensors); None = the whole array.
  rows: None, or the order of the stored tensor's rows in ours (ours[i] = stored[rows[i]]:
  DeepSeek's interleaved rotary rows, `rope.interleaved_to_half`)."""
  hf_key: str
  flax_path: tuple
  expert: Optional[int]
  transpose: bool
  rows: Optional[tuple] = None


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
  if family in DEEPSEEK:
    yield from deepseek_tensors(family, cfg)
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


def _rope_rows(width: int, rope_start: int, rope_dim: int, blocks: int = 1) -> tuple:
  """Row order turning `blocks` blocks of `width` rows, each with interleaved rotary rows
  at rope_start..+rope_dim, into half-rotation order."""
  half = rope.interleaved_to_half(rope_dim)
  out = []
  for b in range(blocks):
    base = b * width
    out += [base + i for i in range(rope_start)]
    out += [base + rope_start + int(j) for j in half]
    out += [base + i for i in range(rope_start + rope_dim, width)]
  return tuple(out)


def deepseek_tensors(family: str, cfg, interleaved: bool = True) -> Iterator[Tensor]:
  """DeepSeek-V2/V3's layout (transformers' checkpoint keys). interleaved: the checkpoint's
  rotary rows are interleaved (DeepSeek-V2 always; V3 with `rope_interleave`, its default)."""
  n, h, r = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim
  q_rows = _rope_rows(h, h - r, r, n) if interleaved else None
  kv_rows = _rope_rows(cfg.kv_lora_rank + r, cfg.kv_lora_rank, r) if interleaved else None
  yield Tensor("model.embed_tokens.weight", _path("token_embedder/embedding"), None, False)
  for i in range(cfg.num_layers):
    flax = f"decoder/layers_{i}"
    hf = f"model.layers.{i}"
    att = f"{flax}/self_attention"
    yield Tensor(f"{hf}.input_layernorm.weight",
                 _path(f"{flax}/pre_self_attention_layer_norm/scale"), None, False)
    if cfg.q_lora_rank:
      yield Tensor(f"{hf}.self_attn.q_a_proj.weight", _path(f"{att}/query_a/kernel"), None, True)
      yield Tensor(f"{hf}.self_attn.q_a_layernorm.weight", _path(f"{att}/query_a_norm/scale"),
                   None, False)
      yield Tensor(f"{hf}.self_attn.q_b_proj.weight", _path(f"{att}/query_b/kernel"), None, True,
                   q_rows)
    else:
      yield Tensor(f"{hf}.self_attn.q_proj.weight", _path(f"{att}/query/kernel"), None, True,
                   q_rows)
    yield Tensor(f"{hf}.self_attn.kv_a_proj_with_mqa.weight", _path(f"{att}/kv_a/kernel"), None,
                 True, kv_rows)
    yield Tensor(f"{hf}.self_attn.kv_a_layernorm.weight", _path(f"{att}/kv_a_norm/scale"), None,
                 False)
    yield Tensor(f"{hf}.self_attn.kv_b_proj.weight", _path(f"{att}/kv_b/kernel"), None, True)
    yield Tensor(f"{hf}.self_attn.o_proj.weight", _path(f"{att}/out/kernel"), None, True)
    yield Tensor(f"{hf}.post_attention_layernorm.weight",
                 _path(f"{flax}/pre_mlp_layer_norm/scale"), None, False)
    if cfg.is_moe_layer(i):
      moe = f"{hf}.mlp"
      yield Tensor(f"{moe}.gate.weight", _path(f"{flax}/mlp/router/router_weights/w/kernel"),
                   None, True)
      if cfg.expert_bias:
        yield Tensor(f"{moe}.gate.e_score_correction_bias", _path(f"{flax}/mlp/expert_bias"),
                     None, False)
      for e in range(cfg.num_experts):
        for ours, theirs in zip(("wi_0", "wi_1", "wo"), _GATED_NAMES):
          yield Tensor(f"{moe}.experts.{e}.{theirs}.weight",
                       _path(f"{flax}/mlp/expert/{ours}/kernel"), e, True)
      for ours, theirs in zip(("wi_0", "wi_1", "wo"), _GATED_NAMES):
        yield Tensor(f"{moe}.shared_experts.{theirs}.weight",
                     _path(f"{flax}/mlp/shared_expert/ffn/{ours}/kernel"), None, True)
    else:
      for ours, theirs in zip(("wi_0", "wi_1", "wo"), _GATED_NAMES):
        yield Tensor(f"{hf}.mlp.{theirs}.weight", _path(f"{flax}/mlp/{ours}/kernel"), None, True)
  yield Tensor("model.norm.weight", _path("decoder/decoder_norm/scale"), None, False)
  yield Tensor("lm_head.weight", _path("decoder/logits_dense/kernel"), None, True)


def rope_interleaved(hf: dict) -> bool:
  """Whether a DeepSeek checkpoint's rotary rows are interleaved (V2: always; V3: its
  `rope_interleave`, default true)."""
  return hf.get("model_type") == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def skipped_layers(hf: dict) -> tuple:
  """Checkpoint key prefixes the import leaves out: DeepSeek-V3's multi-token-prediction
  layers model.layers.{L}.. (as transformers `DeepseekV3ForCausalLM` does)."""
  if hf.get("model_type") != "deepseek_v3":
    return ()
  first = hf["num_hidden_layers"]
  return tuple(f"model.layers.{first + j}." for j in range(int(hf.get(
      "num_nextn_predict_layers") or 0)))


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
  if family in DEEPSEEK:
    return _deepseek_fields(hf, family)
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


def _rope_parameters(hf: dict) -> dict:
  """transformers 5's `rope_parameters`, or the older `rope_theta` + `rope_scaling` (the
  released DeepSeek files), as one dict with `rope_type` and `rope_theta`."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  if not params:
    params = {**scaling, "rope_theta": hf.get("rope_theta")}
  params["rope_type"] = (params.get("rope_type") or params.get("type") or scaling.get("type")
                         or "default")
  if params.get("rope_theta") is None:
    params["rope_theta"] = hf.get("rope_theta")
  if params["rope_theta"] is None:
    raise ValueError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
  return params


def _yarn_fields(params: dict, qk_head_dim: int) -> dict:
  """ModelConfig RoPE fields and the attention scale from DeepSeek's RoPE parameters: the
  default RoPE, or YaRN as transformers `_compute_yarn_parameters` and DeepSeek's
  `yarn_apply_mscale` read it (softmax scale times mscale(factor, mscale_all_dim)^2)."""
  out = {"rope_max_timescale": float(params["rope_theta"]), "attention_scale": qk_head_dim**-0.5}
  kind = params["rope_type"]
  if kind == "default":
    return out
  if kind != "yarn":
    raise ValueError(f"rope type {kind!r} is not supported; DeepSeek's are 'default' and 'yarn'")
  if not params.get("truncate", True):
    raise ValueError("YaRN with truncate=false is not supported")
  factor = float(params["factor"])
  mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    attention_factor = (rope.yarn_mscale(factor, mscale) / rope.yarn_mscale(factor, mscale_all)
                        if mscale and mscale_all else rope.yarn_mscale(factor))
  if mscale_all:
    out["attention_scale"] *= rope.yarn_mscale(factor, mscale_all)**2
  out.update(rope_scaling="yarn", rope_scaling_factor=factor,
             rope_original_max_len=int(params["original_max_position_embeddings"]),
             rope_beta_fast=float(params.get("beta_fast") or 32),
             rope_beta_slow=float(params.get("beta_slow") or 1),
             rope_attention_factor=float(attention_factor))
  return out


_DEEPSEEK_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                      "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                      "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                      "qk_nope_head_dim", "v_head_dim")


def _deepseek_fields(hf: dict, family: str) -> dict:
  missing = [k for k in _DEEPSEEK_REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"{family} config.json lacks {', '.join(missing)}")
  _refuse(hf, "quantization_config", lambda v: not v,
          "a quantized (FP8) checkpoint: convert it to bfloat16 first, e.g. with DeepSeek's "
          "inference/fp8_cast_bf16.py")
  _refuse(hf, "hidden_act", lambda v: v == "silu", "an FFN activation other than silu")
  _refuse(hf, "tie_word_embeddings", lambda v: not v, "tied input and output embeddings")
  _refuse(hf, "attention_bias", lambda v: not v, "biases in the attention projections")
  _refuse(hf, "mlp_bias", lambda v: not v, "biases in the FFNs")
  _refuse(hf, "moe_layer_freq", lambda v: v in (None, 1),
          "MoE layers other than every layer after first_k_dense_replace (transformers' rule)")
  heads = hf["num_attention_heads"]
  _refuse(hf, "num_key_value_heads", lambda v: v in (None, heads),
          "key/value heads other than num_attention_heads under latent attention")
  layers, first_dense = hf["num_hidden_layers"], int(hf.get("first_k_dense_replace") or 0)
  if first_dense >= layers:
    raise ValueError(f"first_k_dense_replace={first_dense} leaves no MoE layer of {layers}")
  qk_head = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
  shared = int(hf.get("n_shared_experts") or 0)
  if not shared:
    raise ValueError("n_shared_experts=0: the DeepSeek layouts have shared experts")
  groups, top_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
  fields = {
      "vocab_size": hf["vocab_size"], "emb_dim": hf["hidden_size"], "num_heads": heads,
      "head_dim": qk_head, "num_layers": layers, "mlp_dim": hf["intermediate_size"],
      "expert_mlp_dim": hf["moe_intermediate_size"], "num_experts": hf["n_routed_experts"],
      "num_selected_experts": hf["num_experts_per_tok"],
      "num_sparse_layers": layers - first_dense, "first_k_dense_layers": first_dense,
      "moe_layer_freq": 1, "num_shared_experts": shared,  # of EXPERT_MLP_DIM each
      "kv_lora_rank": hf["kv_lora_rank"], "q_lora_rank": int(hf.get("q_lora_rank") or 0),
      "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"],
      "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
      "routed_scaling_factor": float(hf.get("routed_scaling_factor") or 1.0),
      "mlp_layout": "gated", "moe_extra_mlp": False, "capacity_mode": "dropless",
      "z_loss": 0.0, "router_z_loss_factor": 0.0,
      "aux_loss_factor": float(hf.get("aux_loss_alpha") or 0.0),
      "balance_loss": "sequence" if hf.get("seq_aux", True) else "switch",
      "moe_float32_output": False, "float32_attention_logits": True,
      **_yarn_fields(_rope_parameters(hf), qk_head),
  }
  if family == "deepseek_v3":
    fields.update(router_score="sigmoid", renormalize_gates=bool(hf.get("norm_topk_prob")),
                  expert_bias=True)
    if groups > 1:
      fields.update(num_expert_groups=groups, topk_groups=top_groups)
    return fields
  method = hf.get("topk_method") or "greedy"
  if method not in ("greedy", "group_limited_greedy"):
    raise ValueError(f"topk_method={method!r} is not DeepSeek-V2's (greedy, "
                     "group_limited_greedy)")
  # transformers' DeepseekV2TopkRouter never renormalises; DeepSeek's own code does when
  # norm_topk_prob is set: the two disagree, so such a file is refused (released ones: false).
  _refuse(hf, "norm_topk_prob", lambda v: not v, "renormalised DeepSeek-V2 gates, which "
          "transformers' DeepseekV2 ignores")
  fields.update(router_score="softmax", renormalize_gates=False)
  if method == "group_limited_greedy" and groups > 1:
    fields.update(num_expert_groups=groups, topk_groups=top_groups, expert_group_score="max")
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
  if cfg.mla:
    return "deepseek_v3" if cfg.router_score == "sigmoid" or cfg.expert_bias else "deepseek_v2"
  return {norm: family for family, norm in QK_NORM.items()}[cfg.qk_norm]


def unexportable(cfg, family: str) -> list:
  """What of `cfg` the family's layout (transformers' modelling code) cannot hold ([] when
  it holds everything)."""
  if family in DEEPSEEK:
    return _deepseek_unexportable(cfg, family)
  out = name_map.unexportable_designs(cfg) + name_map.unexportable_attention(cfg)
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


def _deepseek_unexportable(cfg, family: str) -> list:
  out = []
  if cfg.router == "experts_choose":
    out.append("expert-choice routing (ROUTER='experts_choose')")
  if not cfg.mla:
    out.append("standard attention (it has multi-head latent attention: KV_LORA_RANK > 0)")
  if cfg.mlp_layout != "gated":
    out.append(f"OpenMoE's FFN layout (MLP_LAYOUT={cfg.mlp_layout!r}; it needs 'gated')")
  if cfg.moe_extra_mlp and cfg.num_sparse_layers:
    out.append("OpenMoE's extra FFN in MoE layers (MOE_EXTRA_MLP=True)")
  if not cfg.num_shared_experts or cfg.shared_expert_gate or \
      cfg.shared_width != cfg.num_shared_experts * cfg.expert_mlp_dim:
    out.append("shared experts other than NUM_SHARED_EXPERTS > 0 ungated experts of "
               "EXPERT_MLP_DIM each")
  first = cfg.num_layers - cfg.num_sparse_layers
  if cfg.moe_layers != tuple(range(first, cfg.num_layers)):
    out.append(f"MoE layers {list(cfg.moe_layers)} (it has dense first layers, then MoE only)")
  # Without YaRN's mscale (a factor above 1) the softmax scale is head_dim**-0.5.
  if (cfg.rope_scaling == "none" or cfg.rope_scaling_factor == 1.0) and not math.isclose(
      cfg.attention_scale, cfg.head_dim**-0.5, rel_tol=1e-6):
    out.append(f"ATTENTION_SCALE={cfg.attention_scale} (without YaRN scaling it is "
               f"head_dim**-0.5 = {cfg.head_dim**-0.5:.8g})")
  if family == "deepseek_v3":
    if cfg.router_score != "sigmoid":
      out.append(f"ROUTER_SCORE={cfg.router_score!r} (DeepSeek-V3's router is 'sigmoid')")
    if cfg.num_expert_groups and cfg.expert_group_score != "top2_sum":
      out.append("EXPERT_GROUP_SCORE='max' (DeepSeek-V3 scores a group by its two best)")
  else:
    if cfg.router_score != "softmax" or cfg.renormalize_gates:
      out.append("a router other than softmax without renormalised gates (DeepSeek-V2's)")
    if cfg.num_expert_groups and cfg.expert_group_score != "max":
      out.append("EXPERT_GROUP_SCORE='top2_sum' (DeepSeek-V2 scores a group by its best)")
    if cfg.expert_bias:
      out.append("the loss-free balancing bias (DeepSeek-V3's, not V2's)")
  return out


def _deepseek_config(cfg, family: str) -> dict:
  """The DeepSeek keys of config.json (transformers' configuration_deepseek_v2/v3.py)."""
  theta = cfg.rope_max_timescale
  rope_parameters = {"rope_type": "default", "rope_theta": theta}
  if cfg.rope_scaling == "yarn":
    # The softmax scale as YaRN's mscale_all_dim: scale = head_dim**-0.5 * mscale(factor, m)^2.
    ratio = math.sqrt(cfg.attention_scale / cfg.head_dim**-0.5)
    log = math.log(cfg.rope_scaling_factor)
    rope_parameters.update(rope_type="yarn", factor=cfg.rope_scaling_factor,
                           original_max_position_embeddings=cfg.rope_original_max_len,
                           beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                           attention_factor=cfg.rope_attention_factor,
                           mscale_all_dim=(ratio - 1) / (0.1 * log) if log else 0.0)
  out = {
      "n_routed_experts": cfg.num_experts, "n_shared_experts": cfg.num_shared_experts,
      "moe_intermediate_size": cfg.expert_mlp_dim, "intermediate_size": cfg.mlp_dim,
      "num_key_value_heads": cfg.num_heads, "first_k_dense_replace":
          cfg.num_layers - cfg.num_sparse_layers,
      "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank or None,
      "qk_rope_head_dim": cfg.qk_rope_head_dim,
      "qk_nope_head_dim": cfg.head_dim - cfg.qk_rope_head_dim,
      "v_head_dim": cfg.value_head_dim, "head_dim": cfg.qk_rope_head_dim,
      "n_group": cfg.num_expert_groups or 1, "topk_group": cfg.topk_groups or 1,
      "routed_scaling_factor": cfg.routed_scaling_factor,
      "norm_topk_prob": cfg.renormalize_gates, "rope_theta": theta,
      "rope_parameters": rope_parameters, "attention_bias": False,
      "aux_loss_alpha": cfg.aux_loss_factor, "seq_aux": cfg.balance_loss == "sequence",
  }
  if family == "deepseek_v3":
    out.update(rope_interleave=True, num_nextn_predict_layers=0)
  else:
    out.update(topk_method="group_limited_greedy" if cfg.num_expert_groups else "greedy",
               moe_layer_freq=1, mlp_bias=False)
  return out


def hf_config(cfg, family: str, torch_dtype: str = "float32") -> dict:
  """config.json of `family` for a ModelConfig (`unexportable(cfg, family)` must be [])."""
  if family in DEEPSEEK:
    out = {
        "architectures": [{"deepseek_v2": "DeepseekV2ForCausalLM",
                           "deepseek_v3": "DeepseekV3ForCausalLM"}[family]],
        "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "num_experts_per_tok": cfg.num_selected_experts, "tie_word_embeddings": False,
        "max_position_embeddings": max(4096, cfg.rope_original_max_len * int(
            cfg.rope_scaling_factor)), "attention_dropout": 0.0, "use_cache": True,
        "dtype": torch_dtype, "torch_dtype": torch_dtype, **_deepseek_config(cfg, family)}
    return out
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
