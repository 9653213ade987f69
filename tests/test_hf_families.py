"""Mixtral, OLMoE and Qwen3-MoE from and to Hugging Face, against transformers' own code.

For each family a tiny random model is built with transformers' classes (offline, from a
config with every feature the family has switched on: grouped-query attention with 2 query
heads per key/value head, QK-norm, a RoPE theta of its own, dense first layers, gates
renormalised or not), its weights perturbed so that every norm scale and projection matters,
and saved with `save_pretrained`. `openmoe-import` reads it; our float32 model must give
transformers' per-token log-probs within 1e-5 and its 32 greedy tokens; `openmoe-export`
writes it back and transformers loads it, without remote code, to the same tensors.
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
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              num_experts_per_tok=2, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, rope_theta=5e4, rms_norm_eps=1e-5),
    "olmoe": dict(num_experts=4, norm_topk_prob=False, rope_theta=1e4, rms_norm_eps=1e-5),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, head_dim=12,
                      mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=True,
                      rope_theta=1e6, rms_norm_eps=1e-6),
}
# What our config must hold for each (a check that the features are really on).
EXPECT = {
    "mixtral": dict(qk_norm="none", router_score="softmax_selected", moe_layers=(0, 1, 2)),
    "olmoe": dict(qk_norm="projection", router_score="softmax", renormalize_gates=False,
                  moe_layers=(0, 1, 2)),
    "qwen3_moe": dict(qk_norm="head", router_score="softmax", renormalize_gates=True,
                      moe_layers=(1, 2), head_dim=12, expert_mlp_dim=24),
}


def _hf_model(family, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  model = _hf_model(family)
  model.save_pretrained(root / "hf")
  (root / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')  # kept and written back
  out = hf_import.import_checkpoint(str(root / "hf"), str(root / "run"))
  assert out["family"] == family
  return family, model, root


def _ours(root):
  params, _ = run_dir.load_params(str(root / "run"))
  cfg = run_dir.load_model_config(str(root / "run")).replace(activation_dtype="float32")
  return params, cfg


def _tokens(rows=2, length=20, seed=1):
  # Ids from 1 up: our data pipeline reads id 0 as padding (t5x's convention).
  return np.random.default_rng(seed).integers(1, VOCAB, size=(rows, length)).astype(np.int32)


def test_config_holds_the_family_features(imported):
  family, _, root = imported
  cfg = run_dir.load_model_config(str(root / "run"))
  assert cfg.num_kv_heads == 2 and cfg.mlp_layout == "gated" and not cfg.moe_extra_mlp
  assert cfg.capacity_mode == "dropless"
  head_dim = EXPECT[family].get("head_dim", 8)
  assert cfg.attention_scale == pytest.approx(head_dim**-0.5, rel=1e-12)
  assert cfg.rope_max_timescale == FAMILIES[family]["rope_theta"]
  for k, v in EXPECT[family].items():
    assert getattr(cfg, k) == v, k
  assert json.loads((root / "run" / "imported_from.json").read_text())["family"] == family


def test_log_probs_equal_transformers_within_1e5(imported):
  import jax
  from openmoe_jax.model.transformer import Transformer
  family, model, root = imported
  params, cfg = _ours(root)
  tokens = _tokens()
  ours = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, tokens)[0], axis=-1)
  with torch.no_grad():
    ref = torch.log_softmax(model(torch.from_numpy(tokens).long()).logits, -1).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_greedy_decoding_gives_transformers_tokens(imported):
  from openmoe_jax.evaluation import decoding
  family, model, root = imported
  params, cfg = _ours(root)
  prompt = _tokens(1, 5, seed=2)[0].tolist()
  got = decoding.generate(params, cfg, [prompt], max_new_tokens=32, add_bos=False,
                          eos_id=-1)[0].ids
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  assert list(got) == ref[0, len(prompt):].tolist()


def test_export_loads_in_transformers_without_remote_code(imported):
  family, model, root = imported
  out = hf_export.export(str(root / "run"), str(root / "export"))
  assert out["family"] == family
  assert (root / "export" / "tokenizer.json").read_text() == '{"version": "1.0"}'
  back = transformers.AutoModelForCausalLM.from_pretrained(str(root / "export")).eval()
  assert type(back) is type(model)
  want, got = model.state_dict(), back.state_dict()
  assert sorted(want) == sorted(got)
  for k in want:
    assert torch.equal(want[k], got[k]), k
  tokens = torch.from_numpy(_tokens()).long()
  with torch.no_grad():
    assert torch.equal(model(tokens).logits, back(tokens).logits)


def test_bad_family_inputs_are_one_line_and_write_nothing(tmp_path):
  hf = _hf_model("mixtral")
  hf.save_pretrained(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  for change, words in ((dict(model_type="gpt_oss"), "model_type 'gpt_oss'"),
                        (dict(model_type="deepseek_v3"), "deepseek_v3 config.json lacks"),
                        (dict(tie_word_embeddings=True), "tied input and output embeddings"),
                        (dict(sliding_window=64), "sliding-window attention"),
                        (dict(intermediate_size=48), "the model needs"),
                        (dict(num_local_experts=8), "lacks 36 mixtral tensors")):
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UsageError) as e:
      hf_import.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
    assert words in str(e.value) and "\n" not in str(e.value), (change, str(e.value))
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run")]


@pytest.mark.slow
def test_an_imported_family_fine_tunes_on_an_expert_mesh_resumes_and_exports(tmp_path):
  """Qwen3-MoE (per-head QK-norm, GQA, a dense first layer) from transformers, imported,
  fine-tuned 2 steps with its experts over 4 devices (data 2 x expert 4), resumed for a third,
  exported, and loaded by transformers: its logits equal ours from the last checkpoint."""
  import jax
  from openmoe_jax.commands import export as export_cmd
  from openmoe_jax.commands import import_model as import_cmd
  from openmoe_jax.commands import train as train_cmd
  from openmoe_jax.model.transformer import Transformer
  torch.manual_seed(0)
  hf_cfg = transformers.AutoConfig.for_model(
      "qwen3_moe", **{**COMMON, "vocab_size": 8192, "num_hidden_layers": 2},
      **FAMILIES["qwen3_moe"])
  transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).save_pretrained(
      tmp_path / "hf")
  assert import_cmd.main([f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'imported'}"]) == 0
  run = tmp_path / "ft"
  model = ["--gin_file=models/qwen3_30b_a3b.gin", "--gin.NUM_EMBEDDINGS=8192",
           "--gin.EMBED_DIM=32", "--gin.NUM_HEADS=4", "--gin.NUM_KV_HEADS=2", "--gin.HEAD_DIM=12",
           f"--gin.ATTENTION_SCALE={12 ** -0.5!r}", "--gin.MLP_DIM=40", "--gin.EXPERT_MLP_DIM=24",
           "--gin.NUM_DECODER_LAYERS=2", "--gin.NUM_EXPERTS=4", "--gin.NUM_SELECTED_EXPERTS=2",
           "--gin.FIRST_K_DENSE_LAYERS=1", "--gin.MOE_LAYER_FREQ=1",
           "--gin.NUM_DECODER_SPARSE_LAYERS=1", "--gin.ACTIVATION_DTYPE='float32'"]
  flags = [*model, "--gin_file=runs/finetune.gin", f"--gin.MODEL_DIR='{run}'",
           f"--gin.INITIAL_CHECKPOINT_DIR='{tmp_path / 'imported'}'",
           "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
           "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
           "--gin.NUM_EXPERT_PARTITIONS=4", "--gin.CHECKPOINT_PERIOD=1", "--gin.EVAL_PERIOD=0",
           "--gin.DROPOUT_RATE=0.0", "--gin.train.progress_bar=False",
           "--gin.train.log_period=1"]
  assert train_cmd.main([*flags, "--gin.TRAIN_STEPS=2"]) == 0
  assert train_cmd.main([*flags, "--gin.TRAIN_STEPS=3"]) == 0  # resumes from step 2
  rows = [json.loads(l) for l in open(run / "metrics.jsonl") if '"loss"' in l]
  assert sorted({r["step"] for r in rows}) == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert export_cmd.main([f"--model_dir={run}", f"--output_dir={tmp_path / 'out'}"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(back).__name__ == "Qwen3MoeForCausalLM"
  params, step = run_dir.load_params(str(run))
  assert step == 3
  cfg = run_dir.load_model_config(str(run))
  tokens = _tokens(2, 16, seed=3) * 50 + 7  # ids across the 8192 vocabulary, none 0
  ours = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, tokens)[0], axis=-1)
  with torch.no_grad():
    ref = torch.log_softmax(back(torch.from_numpy(tokens).long()).logits, -1).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(imported):
  """bfloat16 activations: the mean error of our log-probs against transformers' float32 ones
  is within twice transformers' own bfloat16 mean error (the casts differ: we keep attention
  logits and softmax in float32, FLOAT32_ATTENTION_LOGITS; transformers computes q.k in
  bfloat16). The mean, not the max: a token whose top-k flips under rounding (in either
  implementation, at different tokens) moves by far more than rounding does."""
  import copy
  import jax
  from openmoe_jax.model.transformer import Transformer
  family, model, root = imported
  params, cfg = _ours(root)
  tokens = _tokens()
  ours = jax.nn.log_softmax(Transformer(cfg.replace(activation_dtype="bfloat16")).apply(
      {"params": params}, tokens)[0], axis=-1)
  half = copy.deepcopy(model).to(torch.bfloat16)
  with torch.no_grad():
    ref = torch.log_softmax(model(torch.from_numpy(tokens).long()).logits, -1).numpy()
    theirs = torch.log_softmax(half(torch.from_numpy(tokens).long()).logits.float(), -1).numpy()
  err_ours = float(np.mean(np.abs(np.asarray(ours, np.float32) - ref)))
  err_theirs = float(np.mean(np.abs(theirs - ref)))
  assert 0 < err_ours <= 2 * err_theirs, (err_ours, err_theirs)
