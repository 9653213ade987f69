"""Sparse upcycling (`openmoe-import --upcycle_from`): a dense Llama or Qwen3 model from
transformers' own classes becomes an MoE whose logits equal the dense model's (gates summing
to one over the selected experts, nothing dropped), and one training step moves its experts
apart; granular upcycling too (the dense FFN cut into G narrower experts, the router tying
each copy's slices, the top-k holding whole copies). Bad input is one line and nothing
written."""
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


def _logits_and_grads(cfg, params, tokens):
  """The MoE's logits on `tokens` and the gradient of its next-token loss, both jitted."""
  import jax
  import jax.numpy as jnp
  from openmoe_jax.model.transformer import Transformer
  model = Transformer(cfg)

  def loss(p):
    lp = jax.nn.log_softmax(model.apply({"params": p}, tokens[:, :-1])[0], axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

  params = jax.tree.map(jnp.asarray, params)
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(params)
  return np.asarray(logits), jax.jit(jax.grad(loss))(params)


def _upcycle(kind, tmp_path, *extra):
  """(dense transformers model, params, cfg) of `kind` upcycled with the gin flags `extra`."""
  dense = _dense(kind)
  dense.save_pretrained(tmp_path / "dense")
  run = tmp_path / "moe"
  assert import_cmd.main([f"--upcycle_from={tmp_path / 'dense'}", f"--model_dir={run}",
                          *CASES[kind][1], *SIZES, *extra, "--seed=3"]) == 0
  params, step = run_dir.load_params(str(run))
  assert step == 0
  assert json.loads((run / "imported_from.json").read_text())["family"] == kind
  return dense, params, run_dir.load_model_config(str(run))


def _dense_logits(dense, tokens):
  with torch.no_grad():
    return dense(torch.from_numpy(tokens).long()).logits.numpy()


TOKENS = np.random.default_rng(1).integers(1, VOCAB, size=(2, 20)).astype(np.int32)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_upcycled_model_equals_the_dense_one_and_training_moves_experts_apart(kind, tmp_path):
  dense, params, cfg = _upcycle(kind, tmp_path)
  assert cfg.moe_layers == (0, 1) and cfg.num_experts == 4
  wi_0 = params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert all(np.array_equal(wi_0[e], wi_0[0]) for e in range(4))  # copies of the dense FFN
  np.testing.assert_array_equal(
      wi_0[0], dense.model.layers[1].mlp.gate_proj.weight.detach().numpy().T)
  router = params["decoder"]["layers_0"]["mlp"]["router"]["router_weights"]["w"]["kernel"]
  assert router.shape == (32, 4) and 0.01 < float(np.std(router)) < 0.04  # fresh, std 0.02
  logits, grads = _logits_and_grads(cfg, params, TOKENS)
  np.testing.assert_allclose(logits, _dense_logits(dense, TOKENS), atol=1e-5, rtol=1e-5)
  g = np.asarray(grads["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"])
  moved = wi_0 - 0.1 * g  # one SGD step: the experts are no longer copies
  assert min(np.max(np.abs(moved[e] - moved[0])) for e in range(1, 4)) > 1e-6


# Granular upcycling of the 40-wide dense FFN: (gin flags, G, routed_scaling_factor).
GRANULAR = {
    # Llama -> Mixtral's design, G = 4: 8 experts of width 10 (two copies), top-4 (one copy).
    "llama": (["--gin.EXPERT_MLP_DIM=10", "--gin.NUM_EXPERTS=8", "--gin.NUM_SELECTED_EXPERTS=4"],
              4, 1.0),
    # Qwen3 -> sigmoid scores renormalised over the top-k, times 2.5 (DeepSeek-V3's), G = 2:
    # 6 experts of width 20 (three copies), top-4 (two copies) within the best 2 of 3 groups.
    "qwen3": (["--gin.EXPERT_MLP_DIM=20", "--gin.NUM_EXPERTS=6", "--gin.NUM_SELECTED_EXPERTS=4",
               "--gin.ROUTER_SCORE='sigmoid'", "--gin.ROUTED_SCALING_FACTOR=2.5",
               "--gin.NUM_EXPERT_GROUPS=3", "--gin.TOPK_GROUPS=2"], 2, 2.5),
}


@pytest.mark.parametrize("kind", sorted(GRANULAR))
def test_granular_upcycling_equals_the_dense_model_and_training_moves_copies_apart(
    kind, tmp_path):
  flags, g, factor = GRANULAR[kind]
  dense, params, cfg = _upcycle(kind, tmp_path, *flags)
  e_total, width = cfg.num_experts, 40 // g
  assert cfg.expert_mlp_dim == width and cfg.routed_scaling_factor == factor
  mlp = dense.model.layers[1].mlp
  gate, up, down = (m.weight.detach().numpy().T for m in (mlp.gate_proj, mlp.up_proj,
                                                           mlp.down_proj))
  expert = params["decoder"]["layers_1"]["mlp"]["expert"]
  for e in range(e_total):  # expert e: slice e mod G of the dense hidden units
    cut = slice((e % g) * width, (e % g + 1) * width)
    np.testing.assert_array_equal(expert["wi_0"]["kernel"][e], gate[:, cut])
    np.testing.assert_array_equal(expert["wi_1"]["kernel"][e], up[:, cut])
    np.testing.assert_allclose(expert["wo"]["kernel"][e], down[cut] * (g / factor), rtol=1e-6)
  router = params["decoder"]["layers_0"]["mlp"]["router"]["router_weights"]["w"]["kernel"]
  assert router.shape == (32, e_total) and 0.01 < float(np.std(router)) < 0.04
  for e in range(e_total):  # a copy's G experts share one fresh column; copies differ
    np.testing.assert_array_equal(router[:, e], router[:, e - e % g])
    assert e < g or not np.array_equal(router[:, e], router[:, e - g])
  logits, grads = _logits_and_grads(cfg, params, TOKENS)
  np.testing.assert_allclose(logits, _dense_logits(dense, TOKENS), atol=1e-5, rtol=1e-5)
  step = {k: np.asarray(a) - 0.1 * np.asarray(b) for k, a, b in (
      ("wi_0", expert["wi_0"]["kernel"], grads["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]
       ["kernel"]),
      ("router", router, grads["decoder"]["layers_0"]["mlp"]["router"]["router_weights"]["w"]
       ["kernel"]))}
  # One SGD step: the copies of a slice differ, and so do the router columns of a copy.
  assert min(np.max(np.abs(step["wi_0"][e] - step["wi_0"][e % g]))
             for e in range(g, e_total)) > 1e-6
  assert min(np.max(np.abs(step["router"][:, e] - step["router"][:, e - e % g]))
             for e in range(e_total) if e % g) > 1e-6


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
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=30"],
       "expert_mlp_dim 30 does not divide the dense FFN width 40"),
      # Granular (G = 40 / expert_mlp_dim > 1) without whole copies or constant gate sums.
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=10",
        "--gin.NUM_EXPERTS=6", "--gin.NUM_SELECTED_EXPERTS=4"],
       "num_experts 6 is not a multiple of G=4"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=20",
        "--gin.NUM_SELECTED_EXPERTS=1"], "num_selected_experts 1 is not a multiple of G=2"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=20",
        "--gin.ROUTER_SCORE='softmax'"], "router_score 'softmax' without renormalize_gates"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=20",
        "--gin.NUM_EXPERT_GROUPS=4", "--gin.TOPK_GROUPS=2"],
       "num_expert_groups 4 makes groups of 1 experts, not a multiple of G=2"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.EXPERT_MLP_DIM=20",
        "--gin.ROUTER='experts_choose'", "--gin.ROUTER_SCORE='softmax'",
        "--gin.RENORMALIZE_GATES=True", "--gin.CAPACITY_MODE='fixed'"],
       "router 'experts_choose' is not 'tokens_choose'"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.ROPE_MAX_TIMESCALE=10000.0"],
       "rope_max_timescale 10000.0 != 50000.0"),
      ([f"--upcycle_from={tmp_path / 'dense'}", *gin, "--gin.QK_NORM='head'"],
       "qk_norm head != none")):
    assert import_cmd.main([*argv, *base]) == 2, argv
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("openmoe-import: error: ") and words in last, (words, last)
    assert not list(tmp_path.glob("out*"))
