"""Sparse upcycling (`openmoe-import --upcycle_from`): a dense Llama or Qwen3 model from
transformers' own classes becomes an MoE whose logits equal the dense model's (gates summing
to one over the selected experts, nothing dropped), and one training step moves its experts
apart. Bad input is one line and nothing written."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from openmoe_jax.commands import import_model as import_cmd  # noqa: E402
from openmoe_jax.training import run_dir  # noqa: E402

VOCAB = 96
DENSE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CASES = {
    # Llama -> Mixtral's design (softmax over the selected logits).
    "llama": (dict(rope_theta=5e4, rms_norm_eps=1e-5, tie_word_embeddings=False),
              ["--gin_file=models/mixtral_8x7b.gin", "--gin.ROPE_MAX_TIMESCALE=50000.0",
               "--gin.NORM_EPS=1e-5", f"--gin.ATTENTION_SCALE={8 ** -0.5!r}",
               "--gin.HEAD_DIM=8"]),
    # Qwen3 (per-head QK-norm, tied embeddings) -> Qwen3-MoE's (renormalised top-k).
    "qwen3": (dict(head_dim=12, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
              ["--gin_file=models/qwen3_30b_a3b.gin", f"--gin.ATTENTION_SCALE={12 ** -0.5!r}",
               "--gin.HEAD_DIM=12"]),
}
SIZES = ["--gin.NUM_EMBEDDINGS=96", "--gin.EMBED_DIM=32", "--gin.NUM_HEADS=4",
         "--gin.NUM_KV_HEADS=2", "--gin.MLP_DIM=40", "--gin.EXPERT_MLP_DIM=40",
         "--gin.NUM_DECODER_LAYERS=2", "--gin.NUM_EXPERTS=4", "--gin.NUM_SELECTED_EXPERTS=2",
         "--gin.ACTIVATION_DTYPE='float32'"]


def _dense(kind, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.AutoConfig.for_model(kind, **DENSE, **CASES[kind][0])
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("kind", sorted(CASES))
def test_upcycled_model_equals_the_dense_one_and_training_moves_experts_apart(kind, tmp_path):
  import jax
  import jax.numpy as jnp
  from openmoe_jax.model.transformer import Transformer
  dense = _dense(kind)
  dense.save_pretrained(tmp_path / "dense")
  run = tmp_path / "moe"
  assert import_cmd.main([f"--upcycle_from={tmp_path / 'dense'}", f"--model_dir={run}",
                          *CASES[kind][1], *SIZES, "--seed=3"]) == 0
  params, step = run_dir.load_params(str(run))
  cfg = run_dir.load_model_config(str(run))
  assert step == 0 and cfg.moe_layers == (0, 1) and cfg.num_experts == 4
  wi_0 = params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert all(np.array_equal(wi_0[e], wi_0[0]) for e in range(4))  # copies of the dense FFN
  np.testing.assert_array_equal(
      wi_0[0], dense.model.layers[1].mlp.gate_proj.weight.detach().numpy().T)
  router = params["decoder"]["layers_0"]["mlp"]["router"]["router_weights"]["w"]["kernel"]
  assert router.shape == (32, 4) and 0.01 < float(np.std(router)) < 0.04  # fresh, std 0.02
  tokens = np.random.default_rng(1).integers(1, VOCAB, size=(2, 20)).astype(np.int32)
  model = Transformer(cfg)
  logits = model.apply({"params": params}, tokens)[0]
  with torch.no_grad():
    ref = dense(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=1e-5)

  def loss(p):
    lp = jax.nn.log_softmax(model.apply({"params": p}, tokens[:, :-1])[0], axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

  grads = jax.grad(loss)(jax.tree.map(jnp.asarray, params))
  g = np.asarray(grads["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"])
  moved = wi_0 - 0.1 * g  # one SGD step: the experts are no longer copies
  assert min(np.max(np.abs(moved[e] - moved[0])) for e in range(1, 4)) > 1e-6
  assert json.loads((run / "imported_from.json").read_text())["family"] == kind


def test_bad_upcycling_input_is_one_line_and_writes_nothing(tmp_path, capsys):
  dense = _dense("llama")
  dense.save_pretrained(tmp_path / "dense")
  moe = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
      "mixtral", **DENSE, num_local_experts=2))
  moe.save_pretrained(tmp_path / "mixtral")
  base = [f"--model_dir={tmp_path / 'out'}"]
  gin = [*CASES["llama"][1], *SIZES]
  for argv, words in (
      ([f"--upcycle_from={tmp_path / 'mixtral'}", *gin], "is an MoE model (mixtral) already"),
      ([f"--upcycle_from={tmp_path / 'dense'}"], "needs the MoE model's --gin_file"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=20"],
       "expert_mlp_dim 20 != 40"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.ROPE_MAX_TIMESCALE=10000.0"],
       "rope_max_timescale 10000.0 != 50000.0"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.QK_NORM='head'"],
       "qk_norm head != none")):
    assert import_cmd.main([*argv, *base]) == 2, argv
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("openmoe-import: error: ") and words in last, (words, last)
    assert not list(tmp_path.glob("out*"))
