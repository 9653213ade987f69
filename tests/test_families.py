"""The family gins build the released models: Mixtral-8x7B, OLMoE-1B-7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite and DeepSeek-V3.

For each gin (gin/models/mixtral_8x7b.gin, olmoe_1b_7b.gin, qwen3_30b_a3b.gin,
deepseek_v2_lite.gin, deepseek_v3.gin) our parameter
count, from the abstract shapes of our Flax model (`model.counts`, what openmoe-info prints),
must equal exactly the count of transformers' own model built on the meta device (no memory)
from the family's released config.json, written out below; and per block (embedding, each
layer, final norm, head), so that a difference names where it is. The ModelConfig the gin
builds must hold the released config's values, and its shapes must be those openmoe-import
derives from that config.json.
"""
import dataclasses
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402

from openmoe_jax import gin_utils  # noqa: E402
from openmoe_jax.model import counts  # noqa: E402
from openmoe_jax.model.config import SHAPE_FIELDS  # noqa: E402

# The released config.json files (mistralai/Mixtral-8x7B-v0.1, allenai/OLMoE-1B-7B-0924,
# Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V2-Lite, deepseek-ai/DeepSeek-V3), the keys that
# shape or route the model (DeepSeek-V3's FP8 quantization_config left out: openmoe-import
# refuses FP8 files, transformers' meta-device model does not depend on it). Where a key is absent from the
# released file (OLMoE's rms_norm_eps) transformers' class default applies and it is left out.
PUBLISHED = {
    "mixtral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, sliding_window=None, router_aux_loss_coef=0.02,
        tie_word_embeddings=False),
    "olmoe": dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        hidden_act="silu", rope_theta=10000.0, max_position_embeddings=4096,
        norm_topk_prob=False, router_aux_loss_coef=0.01, attention_bias=False, clip_qkv=None,
        tie_word_embeddings=False),
    "qwen3_moe": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=40960, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
        attention_bias=False, use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=False),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=6,
        moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False, aux_loss_alpha=0.001,
        seq_aux=True, hidden_act="silu", max_position_embeddings=163840, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=10000, attention_bias=False,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                      "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                      "type": "yarn"}),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
        num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
        aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", max_position_embeddings=163840,
        rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                      "type": "yarn"}),
}
GIN = {"mixtral": "models/mixtral_8x7b.gin", "olmoe": "models/olmoe_1b_7b.gin",
       "qwen3_moe": "models/qwen3_30b_a3b.gin", "deepseek_v2": "models/deepseek_v2_lite.gin",
       "deepseek_v3": "models/deepseek_v3.gin"}
TOTAL = {"mixtral": 46_702_792_704, "olmoe": 6_919_161_856, "qwen3_moe": 30_532_122_624,
         "deepseek_v2": 15_706_484_224, "deepseek_v3": 671_026_404_352}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
# What each gin sets beyond the sizes (the gin files' router and attention sections).
EXPECT = {
    "mixtral": dict(qk_norm="none", router_score="softmax_selected", norm_eps=1e-5,
                    aux_loss_factor=0.02, router_z_loss_factor=0.0),
    "olmoe": dict(qk_norm="projection", router_score="softmax", renormalize_gates=False,
                  norm_eps=1e-5, aux_loss_factor=0.01, router_z_loss_factor=0.001),
    "qwen3_moe": dict(qk_norm="head", router_score="softmax", renormalize_gates=True,
                      norm_eps=1e-6, aux_loss_factor=0.001, router_z_loss_factor=0.0,
                      balance_loss="global"),
}
FAMILIES = sorted(PUBLISHED)


def _config(family):
  gin_utils.parse_gin([GIN[family]], [])
  return gin_utils.model_config()


def _hf_model(family):
  cfg = transformers.AutoConfig.for_model(family, **PUBLISHED[family])
  with torch.device("meta"):
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _block(flax_path: str) -> str:
  """Our parameter path -> the block it belongs to, named as transformers names it."""
  parts = flax_path.split("/")
  if parts[0] == "token_embedder":
    return "model.embed_tokens"
  if parts[1].startswith("layers_"):
    return f"model.layers.{parts[1][len('layers_'):]}"
  return {"decoder_norm": "model.norm", "logits_dense": "lm_head"}[parts[1]]


def _hf_block(name: str) -> str:
  parts = name.split(".")
  if parts[0] == "lm_head":
    return "lm_head"
  return ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])


@pytest.mark.parametrize("family", DEEPSEEK)
def test_deepseek_gin_holds_what_openmoe_import_reads_from_the_released_config(family):
  """Every ModelConfig field openmoe-import sets from the released config.json (sizes, latent
  attention, YaRN and the scale it implies, router, groups, shared experts, dense layers,
  the bias) is what the gin sets; and the layer rule gives transformers' dense layers."""
  from openmoe_jax.interop.hf import families
  cfg, hf = _config(family), PUBLISHED[family]
  fields = families.model_config_fields({"model_type": family, **hf})
  for name, value in fields.items():
    want = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
    assert getattr(cfg, name) == want, name
  assert cfg.mla and cfg.rope_scaling == "yarn" and cfg.expert_bias == (family == "deepseek_v3")
  dense = hf["first_k_dense_replace"]
  assert cfg.moe_layers == tuple(range(dense, hf["num_hidden_layers"]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DEEPSEEK])
def test_gin_holds_the_released_config(family):
  cfg, hf = _config(family), PUBLISHED[family]
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.kv_heads,
          cfg.head_dim, cfg.num_layers) == (
              hf["vocab_size"], hf["hidden_size"], heads, hf["num_key_value_heads"],
              hf["num_key_value_heads"], head_dim, hf["num_hidden_layers"])
  assert cfg.num_experts == hf.get("num_local_experts", hf.get("num_experts"))
  assert cfg.num_selected_experts == hf["num_experts_per_tok"]
  assert cfg.expert_mlp_dim == hf.get("moe_intermediate_size", hf["intermediate_size"])
  assert cfg.mlp_dim == hf["intermediate_size"]
  assert cfg.rope_max_timescale == hf["rope_theta"]
  # rms_norm_eps as transformers reads the file (OLMoE's omits it: its class default).
  assert cfg.norm_eps == transformers.AutoConfig.for_model(family, **hf).rms_norm_eps
  assert cfg.attention_scale == head_dim**-0.5
  assert (cfg.mlp_layout, cfg.moe_extra_mlp, cfg.capacity_mode, cfg.z_loss) == (
      "gated", False, "dropless", 0.0)
  assert (cfg.num_shared_experts, cfg.expert_bias, cfg.routed_scaling_factor) == (0, False, 1.0)
  for name, value in EXPECT[family].items():
    assert getattr(cfg, name) == value, name
  # Every layer MoE (Qwen3: decoder_sparse_step 1, mlp_only_layers []).
  assert [cfg.is_moe_layer(i) for i in range(cfg.num_layers)] == [True] * cfg.num_layers
  assert cfg.moe_layers == tuple(range(cfg.num_layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_equals_transformers(family, monkeypatch):
  cfg = _config(family)
  params = counts.abstract_params(cfg)  # traced once (seconds for 48 layers): summarize reuses it
  monkeypatch.setattr(counts, "abstract_params", lambda _: params)
  flat = traverse_util.flatten_dict(params, sep="/")
  ours = {}
  for path, leaf in flat.items():
    if path.endswith("/expert_bias"):  # a buffer in transformers (e_score_correction_bias)
      continue
    ours[_block(path)] = ours.get(_block(path), 0) + leaf.size
  theirs = {}
  model = _hf_model(family)
  for name, p in model.named_parameters():
    theirs[_hf_block(name)] = theirs.get(_hf_block(name), 0) + p.numel()
  diff = {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys()
          if ours.get(k) != theirs.get(k)}
  assert not diff, f"blocks whose counts differ (ours, transformers'): {diff}"
  total = sum(p.numel() for p in model.parameters())
  assert counts.summarize(cfg)["total_params"] == total == TOTAL[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_gin_shapes_are_what_openmoe_import_derives(family):
  # openmoe-import --gin_file=... refuses a gin whose shape fields differ from config.json's.
  from openmoe_jax.interop.hf import families
  cfg = _config(family)
  from_hf = dataclasses.replace(cfg, **families.model_config_fields(
      {"model_type": family, **PUBLISHED[family]}))
  assert {f: getattr(cfg, f) for f in SHAPE_FIELDS} == {f: getattr(from_hf, f)
                                                         for f in SHAPE_FIELDS}


def test_openmoe_info_prints_the_count():
  r = subprocess.run([sys.executable, "-m", "openmoe_jax.commands.info",
                      "--gin_file=models/olmoe_1b_7b.gin"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout)
  assert out["total_params"] == TOTAL["olmoe"]
  assert out["moe_layers"] == list(range(16))
  assert (out["num_experts"], out["num_selected_experts"]) == (64, 8)
