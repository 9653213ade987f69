"""The routers of `openmoe_jax/model/routers.py` against an independent float64 numpy reference:
selection (ties to the lowest index), gates, group-limited choice and the balancing losses, in
float32 and from bfloat16 logits (the router casts them to float32, the reference uses the same
rounded values), forward and gradients."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.model import routers, routing
from openmoe_jax.model.config import ModelConfig


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _top(values, k):
  """Indices of the k largest per row, ties to the lowest index (a stable sort of -values)."""
  return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def reference_choice(logits, k, kind, renormalize=False, scaling=1.0, bias=None, groups=0,
                     top_groups=0, group_score="top2_sum"):
  """float64 loops over tokens: (probs, gates, expert_index)."""
  logits = np.asarray(logits, np.float64)
  e = logits.shape[-1]
  flat = logits.reshape(-1, e)
  probs, gates, index = [], [], []
  for row in flat:
    scores = 1 / (1 + np.exp(-row)) if kind == "sigmoid" else _softmax(row)
    choice = scores + (0 if bias is None else np.asarray(bias, np.float64))
    if groups:
      size = e // groups
      best = 1 if group_score == "max" else min(2, size)
      group_scores = [np.sort(choice[g * size:(g + 1) * size])[::-1][:best].sum()
                      for g in range(groups)]
      allowed = set(_top(np.asarray(group_scores), top_groups).tolist())
      choice = np.array([c if i // size in allowed else -np.inf for i, c in enumerate(choice)])
    idx = _top(choice, k)
    if kind == "softmax_selected":
      g = _softmax(row[idx])
    else:
      g = scores[idx]
      if renormalize:
        g = g / g.sum()
    probs.append(scores / scores.sum())
    gates.append(g * scaling)
    index.append(idx)
  shape = logits.shape[:-1]
  return (np.array(probs).reshape(*shape, e), np.array(gates).reshape(*shape, k),
          np.array(index).reshape(*shape, k))


CASES = [
    dict(kind="softmax"),
    dict(kind="softmax", renormalize=True),
    dict(kind="softmax_selected"),
    dict(kind="sigmoid", renormalize=True, scaling=2.5),
    dict(kind="sigmoid", renormalize=True, groups=4, top_groups=2),
    dict(kind="softmax", groups=2, top_groups=1),
    dict(kind="softmax", scaling=2.5, groups=4, top_groups=2, group_score="max"),  # DeepSeek-V2
    dict(kind="sigmoid", renormalize=True, groups=4, top_groups=2, bias=True),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_choice_matches_the_float64_reference(case, dtype):
  rng = np.random.default_rng(0)
  e, k = 8, 3
  logits = jnp.asarray(rng.normal(size=(3, 16, e)) * 2, dtype)
  bias = rng.normal(size=(e,)) * 0.3 if case.get("bias") else None
  kwargs = {key: v for key, v in case.items() if key not in ("kind", "bias")}
  got = routers.choose(logits, k, kind=case["kind"], bias=None if bias is None else jnp.asarray(bias, jnp.float32),
                       renormalize=kwargs.get("renormalize", False),
                       scaling_factor=kwargs.get("scaling", 1.0), num_groups=kwargs.get("groups", 0),
                       topk_groups=kwargs.get("top_groups", 0),
                       group_score=kwargs.get("group_score", "top2_sum"))
  want = reference_choice(np.asarray(logits.astype(jnp.float32)), k, case["kind"], bias=bias,
                          **kwargs)
  np.testing.assert_array_equal(np.asarray(got.expert_index), want[2])
  np.testing.assert_allclose(np.asarray(got.gates), want[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.probs), want[0], rtol=1e-5, atol=1e-7)
  assert got.gates.dtype == jnp.float32 and got.probs.dtype == jnp.float32


def test_ties_go_to_the_lowest_index():
  logits = jnp.zeros((1, 2, 6), jnp.float32)
  for kind in routers.ROUTER_SCORES:
    np.testing.assert_array_equal(routers.choose(logits, 3, kind=kind).expert_index[0],
                                  [[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("kind", ["softmax", "softmax_selected", "sigmoid"])
def test_gate_gradients_match_central_differences_of_the_reference(kind):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 4, 8)) * 2
  weights = rng.normal(size=(1, 4, 2))

  def f(x):
    c = routers.choose(x, 2, kind=kind, renormalize=kind == "sigmoid", scaling_factor=1.5)
    return jnp.sum(c.gates * weights)

  grad = np.asarray(jax.grad(f)(jnp.asarray(logits, jnp.float32)))
  ref = lambda x: float(np.sum(reference_choice(x, 2, kind, renormalize=kind == "sigmoid",
                                                scaling=1.5)[1] * weights))
  eps, want = 1e-5, np.zeros_like(logits)
  for i in itertools.product(*map(range, logits.shape)):
    up, down = logits.copy(), logits.copy()
    up[i] += eps
    down[i] -= eps
    want[i] = (ref(up) - ref(down)) / (2 * eps)
  np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)


def test_group_limited_choice_never_leaves_the_chosen_groups():
  """Property test over random scores and biases (negative ones included: a masked expert must
  not win over an allowed one whose biased score is below zero)."""
  rng = np.random.default_rng(2)
  for trial in range(40):
    groups = int(rng.choice([2, 4, 8]))
    e = groups * int(rng.integers(1, 5))
    top = int(rng.integers(1, groups + 1))
    k = int(rng.integers(1, top * (e // groups) + 1))
    logits = jnp.asarray(rng.normal(size=(2, 8, e)) * 3, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(e,)) - 2.0, jnp.float32)
    c = routers.choose(logits, k, kind="sigmoid", renormalize=True, bias=bias, num_groups=groups,
                       topk_groups=top)
    allowed = np.asarray(routers.group_mask(routers.score(logits, "sigmoid") + bias[None, None],
                                            groups, top))
    index = np.asarray(c.expert_index)
    assert np.take_along_axis(allowed, index, axis=-1).all(), trial
    assert allowed.sum(-1).min() == top * (e // groups)
    # k distinct experts per token
    assert all(len(set(row)) == k for row in index.reshape(-1, k))


def _ref_switch(probs, index):
  g, t, e = probs.shape
  total = 0.0
  for gi in range(g):
    for ei in range(e):
      f = np.mean([ei in index[gi, ti] for ti in range(t)])
      total += f * probs[gi, :, ei].mean()
  return total / (g * e) * e * e


def _ref_sequence(probs, index, seq_len):
  e, k = probs.shape[-1], index.shape[-1]
  p, ix = probs.reshape(-1, seq_len, e), index.reshape(-1, seq_len, k)
  losses = []
  for s in range(p.shape[0]):
    f = [e / (k * seq_len) * np.sum(ix[s] == ei) for ei in range(e)]
    losses.append(sum(f[ei] * p[s, :, ei].mean() for ei in range(e)))
  return np.mean(losses)


def _ref_global(probs, index):
  e = probs.shape[-1]
  p, ix = probs.reshape(-1, e), index.reshape(-1, index.shape[-1])
  return e * sum(np.mean([ei in row for row in ix]) * p[:, ei].mean() for ei in range(e))


def test_balance_losses_match_loops():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 12, 8))
  c = routers.choose(jnp.asarray(logits, jnp.float32), 2, kind="sigmoid", renormalize=True)
  probs, index = np.asarray(c.probs, np.float64), np.asarray(c.expert_index)
  got = {kind: float(routers.balance_loss(kind, c.probs, c.expert_index, seq_len=6))
         for kind in routers.BALANCE_LOSSES}
  assert got["switch"] == pytest.approx(_ref_switch(probs, index), rel=1e-5)
  assert got["sequence"] == pytest.approx(_ref_sequence(probs, index, 6), rel=1e-5)
  assert got["global"] == pytest.approx(_ref_global(probs, index), rel=1e-5)
  # Balanced routing: the Switch and global losses are k (top-k fractions sum to k), the
  # sequence loss 1 (DeepSeek-V3's normalisation).
  flat = jnp.full((2, 8, 4), 0.25)
  even = jnp.asarray(np.array([[[i % 4, (i + 1) % 4] for i in range(8)]] * 2), jnp.int32)
  assert float(routers.switch_loss(flat, even)) == pytest.approx(2.0)
  assert float(routers.global_loss(flat, even)) == pytest.approx(2.0)
  assert float(routers.sequence_loss(flat, even, 8)) == pytest.approx(1.0)


def test_the_openmoe_defaults_route_as_before():
  """route() with a default ModelConfig is OpenMoE's router: softmax probabilities, their
  top-2, the Switch loss (the old `load_balancing_loss` name still answers)."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  r = routing.route(ModelConfig(), logits, 4)
  probs = jax.nn.softmax(logits, axis=-1)
  np.testing.assert_array_equal(np.asarray(r.router_probs), np.asarray(probs))
  np.testing.assert_array_equal(np.asarray(r.expert_index),
                                np.asarray(jax.lax.top_k(probs, 2)[1]))
  assert float(r.aux_loss) == float(routing.load_balancing_loss(probs, r.expert_index))


@pytest.mark.parametrize("changes,needle", [
    (dict(num_expert_groups=4, topk_groups=5), "topk_groups=5 must be in [1, num_expert_groups=4]"),
    (dict(num_expert_groups=3), "not divisible by num_expert_groups=3"),
    (dict(num_expert_groups=4, topk_groups=1, num_selected_experts=3), "more than the 2 experts"),
    (dict(topk_groups=2), "needs num_expert_groups > 0"),
    (dict(router_score="softmax_all"), "router_score='softmax_all' not in"),
    (dict(balance_loss="seq"), "balance_loss='seq' not in"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be positive"),
])
def test_bad_router_settings_are_refused(changes, needle):
  with pytest.raises(ValueError, match=None) as e:
    ModelConfig(**changes)
  assert needle in str(e.value)


@pytest.mark.parametrize("flags,needle", [
    (["--gin.NUM_EXPERT_GROUPS=4", "--gin.TOPK_GROUPS=8"], "topk_groups=8"),
    (["--gin.EXPERT_BIAS_UPDATE_RATE=-0.001"], "expert_bias_update_rate must be >= 0"),
])
def test_a_bad_router_setting_is_one_line_from_the_command_and_writes_nothing(
    tmp_path, capsys, flags, needle):
  from openmoe_jax.commands import train as main
  d = tmp_path / "run"
  code = main.main(["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
                    f"--gin.MODEL_DIR='{d}'", "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
                    "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.TRAIN_STEPS=2",
                    "--gin.BATCH_SIZE=8", *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].startswith("openmoe-train: error: ") and needle in err[-1]
  assert not d.exists()


def _mesh_equals_one_device(cfg):
  """Loss and gradients of `cfg` on a (data 2, expert 4) mesh equal one device's; returns
  (params, loss)."""
  from test_partitioning import TOKENS, _loss, _sharded
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.model.transformer import Transformer
  params = part.unbox(Transformer(cfg).init(jax.random.key(1), TOKENS)["params"])
  loss, grads = jax.jit(jax.value_and_grad(lambda p, t: _loss(p, t, cfg)))(params, TOKENS)
  _, _, sharded_loss, sharded_grads, _ = _sharded(4, 1, cfg, values=params)
  np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6), sharded_grads, grads)
  return params, loss


@pytest.mark.parametrize("router,mode", [
    (dict(router_score="sigmoid", renormalize_gates=True, routed_scaling_factor=2.5,
          num_expert_groups=4, topk_groups=2, balance_loss="sequence"), "fixed"),
    (dict(router_score="sigmoid", renormalize_gates=True, num_expert_groups=4, topk_groups=2,
          balance_loss="global"), "dropless"),
    (dict(router_score="softmax_selected", balance_loss="global"), "adaptive"),
    (dict(num_shared_experts=1, shared_expert_gate=True, first_k_dense_layers=1), "dropless"),
])
def test_every_router_composes_with_the_capacity_modes_on_an_expert_mesh(router, mode):
  """Loss and gradients on a (data 2, expert 4) mesh equal one device's, for each router in a
  capacity mode; the balancing loss enters the loss."""
  from test_partitioning import CFG, TOKENS, _loss
  cfg = CFG.replace(capacity_mode=mode, **router)
  params, loss = _mesh_equals_one_device(cfg)
  no_aux = jax.jit(lambda p, t: _loss(p, t, cfg.replace(aux_loss_factor=0.0)))(params, TOKENS)
  assert float(no_aux) != float(loss)


def test_shared_experts_with_the_routed_experts_zeroed_are_a_dense_ffn_of_the_shared_width():
  """A MoE layer whose routed experts are zero computes exactly a dense FFN of width
  SHARED_EXPERT_MLP_DIM on the same input (with the gate, times sigmoid(x w)); the whole model
  uses it (the logits change without it)."""
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.model.layers import MlpBlock
  from openmoe_jax.model.moe import MoeLayer
  from openmoe_jax.model.transformer import Transformer
  for gate in (False, True):
    cfg = ModelConfig(vocab_size=64, activation_dtype="float32", num_shared_experts=2,
                      shared_expert_mlp_dim=48, shared_expert_gate=gate, no_drop=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 1, 64)
    params = part.unbox(Transformer(cfg).init(jax.random.key(1), tokens)["params"])
    moe = params["decoder"]["layers_1"]["mlp"]
    assert moe["shared_expert"]["ffn"]["wi_1"]["kernel"].shape == (32, 48)
    assert ("gate" in moe["shared_expert"]) == gate
    zeroed = {**moe, "expert": jax.tree.map(jnp.zeros_like, moe["expert"])}
    x = jax.random.normal(jax.random.key(2), (2, 16, 32))
    got = MoeLayer(cfg).apply({"params": zeroed}, x, jnp.ones((2, 16), bool),
                              deterministic=True)[0]
    want = MlpBlock(cfg, 48).apply({"params": moe["shared_expert"]["ffn"]}, x, deterministic=True)
    if gate:
      want = want * jax.nn.sigmoid(x @ moe["shared_expert"]["gate"]["kernel"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    with_shared = Transformer(cfg).apply({"params": params}, tokens)[0]
    routed_only = {k: v for k, v in moe.items() if k != "shared_expert"}
    without = jax.tree.map(lambda a: a, params)
    without["decoder"]["layers_1"]["mlp"] = routed_only
    no_shared = Transformer(cfg.replace(num_shared_experts=0)).apply({"params": without}, tokens)[0]
    assert np.abs(np.asarray(with_shared) - np.asarray(no_shared)).max() > 1e-4


def test_deepseeks_layer_rule_and_openmoes_rule():
  openmoe = ModelConfig(num_layers=12, num_sparse_layers=2)
  assert openmoe.moe_layers == (5, 11) and openmoe.moe_interval == 6
  deepseek = ModelConfig(num_layers=6, num_sparse_layers=5, first_k_dense_layers=1)
  assert deepseek.moe_layers == (1, 2, 3, 4, 5) and deepseek.moe_interval is None
  every_other = ModelConfig(num_layers=6, num_sparse_layers=2, first_k_dense_layers=2,
                            moe_layer_freq=2)
  assert every_other.moe_layers == (2, 4)
  with pytest.raises(ValueError, match="num_sparse_layers=3 must be 5"):
    ModelConfig(num_layers=6, num_sparse_layers=3, first_k_dense_layers=1)
  from openmoe_jax.interop.hf import name_map
  assert name_map.unexportable(ModelConfig()) == []
  assert len(name_map.unexportable(deepseek.replace(num_shared_experts=1))) == 2


def test_expert_choice_gives_every_expert_exactly_c_tokens_as_a_loop_does():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 16, 4)), jnp.float32)
  r = routing.experts_choose_routing(logits, 5)
  kept, probs = np.asarray(r.kept), np.asarray(jax.nn.softmax(logits, -1), np.float64)
  assert (kept.sum(axis=1) == 5).all()  # every expert of every group: exactly C tokens
  for g in range(3):
    for e in range(4):
      want = _top(probs[g, :, e], 5)  # a stable sort: ties to the lowest token
      np.testing.assert_array_equal(np.flatnonzero(kept[g, :, e]), np.sort(want))
      np.testing.assert_array_equal(np.asarray(r.position)[g, want, e], np.arange(5))
  np.testing.assert_allclose(np.asarray(r.combine_weights), np.where(kept, probs, 0), rtol=1e-6)
  assert float(r.aux_loss) == 0.0


def test_an_expert_choice_model_trains_on_a_mesh_like_one_device_and_refuses_to_decode():
  from test_partitioning import CFG
  from openmoe_jax.evaluation import decoding
  from openmoe_jax.errors import UsageError
  cfg = CFG.replace(router="experts_choose", train_capacity_factor=2.0)
  params, _ = _mesh_equals_one_device(cfg)
  with pytest.raises(UsageError, match="not causal"):
    decoding.generate(params, cfg, [[5, 6]], max_new_tokens=2)
  with pytest.raises(ValueError, match="capacity_mode='fixed'"):
    ModelConfig(router="experts_choose", capacity_mode="dropless")


def test_info_counts_the_experts_a_token_uses_under_each_router():
  """Active parameters: top-k of E experts for token choice; under expert choice E x C slots for
  T tokens, so the training capacity factor's worth of experts per token on average; shared
  experts are always active."""
  from openmoe_jax.model import counts
  base = counts.summarize(ModelConfig())
  per_expert = base["expert_params"] // 8
  assert base["total_params"] - base["activated_params"] == per_expert * (8 - 2)
  ec = counts.summarize(ModelConfig(router="experts_choose", train_capacity_factor=1.0))
  assert ec["total_params"] - ec["activated_params"] == per_expert * (8 - 1)
  shared = counts.summarize(ModelConfig(num_shared_experts=1))
  assert shared["total_params"] - shared["activated_params"] == per_expert * (8 - 2)
  assert shared["total_params"] > base["total_params"]
