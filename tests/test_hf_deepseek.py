"""DeepSeek-V2 and DeepSeek-V3 from and to Hugging Face, against transformers' own code.

Tiny random models built with transformers' classes (`DeepseekV2ForCausalLM`,
`DeepseekV3ForCausalLM`, offline), every feature on: multi-head latent attention (V3 with a
query latent, V2 without, as V2-Lite), YaRN with a softmax-scale mscale, interleaved rotary rows,
shared experts, a dense first layer, group-limited routing (V3: sigmoid, a group scored by its
two best experts, renormalised gates, the loss-free bias `e_score_correction_bias` perturbed
away from 0; V2: softmax, a group scored by its best), gates times routed_scaling_factor.
Imported, our float32 model gives transformers' per-token log-probs within 1e-5 and its 32
greedy tokens (our cache holds MLA's latent and rotary key); exported, transformers loads it
without remote code to the same tensors, bitwise; bfloat16 errors are within twice
transformers' own; on (data, expert, model) meshes the loss and gradients equal one device's.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from openmoe_jax.errors import UsageError  # noqa: E402
from openmoe_jax.interop import hf_export, hf_import  # noqa: E402
from openmoe_jax.training import run_dir  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=10, v_head_dim=12,
              n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=128,
              tie_word_embeddings=False, rms_norm_eps=1e-5)
YARN = dict(rope_type="yarn", rope_theta=5e4, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1)
FAMILIES = {
    "deepseek_v3": dict(q_lora_rank=24, n_shared_experts=1, norm_topk_prob=True,
                        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "deepseek_v2": dict(q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
}
EXPECT = {
    "deepseek_v3": dict(router_score="sigmoid", renormalize_gates=True, expert_bias=True,
                        expert_group_score="top2_sum", q_lora_rank=24, num_shared_experts=1),
    "deepseek_v2": dict(router_score="softmax", renormalize_gates=False, expert_bias=False,
                        expert_group_score="max", q_lora_rank=0, num_shared_experts=2),
}


def _hf_model(family, seed=0, **changes):
  torch.manual_seed(seed)
  cfg = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **changes})
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # choices that differ from the scores'
        b.add_(0.1 * torch.randn_like(b))
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  model = _hf_model(family)
  model.save_pretrained(root / "hf")
  out = hf_import.import_checkpoint(str(root / "hf"), str(root / "run"))
  assert out["family"] == family
  return family, model, root


def _ours(root):
  params, _ = run_dir.load_params(str(root / "run"))
  cfg = run_dir.load_model_config(str(root / "run")).replace(activation_dtype="float32")
  return params, cfg


def _tokens(rows=2, length=20, seed=1):
  return np.random.default_rng(seed).integers(1, VOCAB, size=(rows, length)).astype(np.int32)


def _reference(model, tokens):
  with torch.no_grad():
    return torch.log_softmax(model(torch.from_numpy(tokens).long()).logits, -1).numpy()


def test_config_holds_the_family_features(imported):
  import math
  family, _, root = imported
  cfg = run_dir.load_model_config(str(root / "run"))
  assert cfg.mla and (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.head_dim, cfg.value_head_dim) \
      == (16, 8, 18, 12)
  assert cfg.moe_layers == (1, 2) and cfg.num_expert_groups == 4 and cfg.topk_groups == 2
  assert cfg.routed_scaling_factor == 2.5 and cfg.norm_eps == 1e-5
  rope = FAMILIES[family]["rope_parameters"]
  mscale = lambda m: 0.1 * m * math.log(4.0) + 1
  assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ("yarn", 4, 32)
  assert cfg.rope_attention_factor == pytest.approx(mscale(rope["mscale"])
                                                    / mscale(rope["mscale_all_dim"]))
  assert cfg.attention_scale == pytest.approx(18**-0.5 * mscale(rope["mscale_all_dim"])**2)
  for k, v in EXPECT[family].items():
    assert getattr(cfg, k) == v, k


def test_log_probs_equal_transformers_within_1e5(imported):
  import jax
  from openmoe_jax.model.transformer import Transformer
  family, model, root = imported
  params, cfg = _ours(root)
  tokens = _tokens()
  ours = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, tokens)[0], axis=-1)
  np.testing.assert_allclose(np.asarray(ours), _reference(model, tokens), atol=1e-5, rtol=0)


def test_the_bias_and_the_rotary_order_matter(imported):
  """The test above can fail: without the imported e_score_correction_bias (V3), or with the
  rotary rows left interleaved, the log-probs move far beyond 1e-5."""
  import jax
  from flax import traverse_util
  from openmoe_jax.model.transformer import Transformer
  family, model, root = imported
  params, cfg = _ours(root)
  tokens = _tokens()
  ref = _reference(model, tokens)
  flat = traverse_util.flatten_dict(params, sep="/")
  changed = []
  if family == "deepseek_v3":
    changed.append({k: (np.zeros_like(v) if k.endswith("expert_bias") else v)
                    for k, v in flat.items()})
  order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  back = np.argsort(order)
  kv = {k: (np.concatenate([v[:, :16], v[:, 16:][:, back]], axis=1)
            if k.endswith("kv_a/kernel") else v) for k, v in flat.items()}
  changed.append(kv)
  for variant in changed:
    p = traverse_util.unflatten_dict(variant, sep="/")
    ours = jax.nn.log_softmax(Transformer(cfg).apply({"params": p}, tokens)[0], axis=-1)
    assert np.max(np.abs(np.asarray(ours) - ref)) > 1e-3


def test_greedy_decoding_with_the_latent_cache_gives_transformers_tokens(imported):
  from openmoe_jax.evaluation import decoding
  from openmoe_jax.model.transformer import cache_layout
  family, model, root = imported
  params, cfg = _ours(root)
  assert cache_layout(cfg)[:2] == ((1, 16), (1, 8))  # the latent and the rotary key
  prompt = _tokens(1, 5, seed=2)[0].tolist()
  got = decoding.generate(params, cfg, [prompt], max_new_tokens=32, add_bos=False,
                          eos_id=-1)[0].ids
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  assert list(got) == ref[0, len(prompt):].tolist()


def test_export_loads_in_transformers_bitwise(imported):
  family, model, root = imported
  out = hf_export.export(str(root / "run"), str(root / "export"))
  assert out["family"] == family
  back = transformers.AutoModelForCausalLM.from_pretrained(str(root / "export")).eval()
  assert type(back) is type(model)
  want, got = model.state_dict(), back.state_dict()
  assert sorted(want) == sorted(got)
  for k in want:
    assert torch.equal(want[k], got[k]), k
  tokens = torch.from_numpy(_tokens()).long()
  with torch.no_grad():
    assert torch.equal(model(tokens).logits, back(tokens).logits)


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(imported):
  """As tests/test_hf_families.py's: the mean error of our bfloat16 log-probs against
  transformers' float32 ones is within twice transformers' own bfloat16 mean error."""
  import copy
  import jax
  from openmoe_jax.model.transformer import Transformer
  family, model, root = imported
  params, cfg = _ours(root)
  tokens = _tokens()
  ours = jax.nn.log_softmax(Transformer(cfg.replace(activation_dtype="bfloat16")).apply(
      {"params": params}, tokens)[0], axis=-1)
  ref = _reference(model, tokens)
  half = copy.deepcopy(model).to(torch.bfloat16)
  with torch.no_grad():
    theirs = torch.log_softmax(half(torch.from_numpy(tokens).long()).logits.float(), -1).numpy()
  err_ours = float(np.mean(np.abs(np.asarray(ours, np.float32) - ref)))
  err_theirs = float(np.mean(np.abs(theirs - ref)))
  assert 0 < err_ours <= 2 * err_theirs, (err_ours, err_theirs)


def _mesh_check(cfg, params, tokens, expert, model):
  import jax
  import test_partitioning
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p, t: test_partitioning._loss(p, t, cfg)))(params, tokens)
  saved, test_partitioning.TOKENS = test_partitioning.TOKENS, tokens
  try:
    _, _, sharded_loss, sharded_grads, _ = test_partitioning._sharded(expert, model, cfg,
                                                                      values=params)
  finally:
    test_partitioning.TOKENS = saved
  np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-5), sharded_grads, grads)


def test_the_family_on_a_mesh_equals_one_device(imported):
  """Loss and gradients on a mesh equal one device's: the imported model with its experts over
  `expert` (data 4 x expert 2); its latent attention with the heads and the up projections
  over `model` (data 2 x expert 2 x model 2), on the same attention without experts (with
  experts, the changed summation order of a model-split matmul can flip a near-tied routing
  choice of these perturbed weights: a discrete change, not an error)."""
  import jax
  from test_partitioning import TOKENS
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.model.transformer import Transformer
  family, _, root = imported
  params, cfg = _ours(root)
  tokens = np.asarray(TOKENS) % (VOCAB - 1) + 1
  _mesh_check(cfg, params, tokens, expert=2, model=1)
  dense = cfg.replace(num_experts=0, num_sparse_layers=0, first_k_dense_layers=0,
                      moe_layer_freq=0, num_shared_experts=0, expert_bias=False,
                      num_expert_groups=0, topk_groups=0)
  fresh = part.unbox(Transformer(dense).init(jax.random.key(1), tokens)["params"])
  noise = np.random.default_rng(0)
  fresh = jax.tree.map(lambda x: x + 0.2 * noise.standard_normal(x.shape).astype(x.dtype), fresh)
  _mesh_check(dense, fresh, tokens, expert=2, model=2)


def test_multi_token_prediction_layers_are_skipped_and_said(tmp_path):
  """DeepSeek-V3's released files hold its MTP module as layer num_hidden_layers: transformers
  skips it, so does the import, and the summary counts what it skipped."""
  import safetensors.torch
  model = _hf_model("deepseek_v3", num_nextn_predict_layers=1)
  model.save_pretrained(tmp_path / "hf")
  path = tmp_path / "hf" / "model.safetensors"
  tensors = safetensors.torch.load_file(str(path))
  tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
  tensors["model.layers.3.enorm.weight"] = torch.ones(32)
  safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
  out = hf_import.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert out["skipped_tensors"] == 2


def test_bad_deepseek_inputs_are_one_line_and_write_nothing(tmp_path):
  model = _hf_model("deepseek_v2")
  model.save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  for change, words in (
      (dict(quantization_config={"quant_method": "fp8"}), "fp8_cast_bf16.py"),
      (dict(norm_topk_prob=True), "transformers' DeepseekV2 ignores"),
      (dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
      (dict(num_key_value_heads=2), "key/value heads other than num_attention_heads"),
      (dict(n_shared_experts=0), "n_shared_experts=0"),
      (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "'longrope'"),
      (dict(kv_lora_rank=32), "the model needs")):
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UsageError) as e:
      hf_import.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
    assert words in str(e.value) and "\n" not in str(e.value), (change, str(e.value))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run")]
