"""Auxiliary-loss-free balancing (`training/expert_bias.py`): the update rule against a numpy
count of the step's own top-k choices, no gradient and no optimizer state for the bias, balance
on a skewed toy problem, a (data, expert) mesh equal to one device, bad rates refused. Resume
after SIGKILL with the bias on: `test_train.test_loss_falls_and_resume_after_sigkill_is_exact`."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openmoe_jax.model import partitioning as part
from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.training import expert_bias, state_layout, steps
from openmoe_jax.training.optimizer import make_optimizer

RATE = 0.01
CFG = ModelConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                  expert_mlp_dim=20, num_layers=2, num_experts=4, num_sparse_layers=1,
                  group_size=16, activation_dtype="float32", router_score="sigmoid",
                  renormalize_gates=True, expert_bias_update_rate=RATE)


def _batch(b=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.integers(1, 64, (b, length)).astype(np.int32)
  t[0, 12:] = 0  # padding: not counted in the load
  return {"decoder_target_tokens": jnp.asarray(t),
          "decoder_input_tokens": jnp.asarray(np.pad(t[:, :-1], ((0, 0), (1, 0)))),
          "decoder_loss_weights": jnp.asarray((t > 0).astype(np.float32)),
          "decoder_segment_ids": jnp.asarray((t > 0).astype(np.int32)),
          "decoder_positions": jnp.broadcast_to(jnp.arange(length), (b, length)).astype(jnp.int32)}


def _init(cfg, tx):
  return part.unbox(jax.jit(lambda r: steps.init_state(cfg, tx, r, 8, 16))(jax.random.key(0)))


def _state(cfg, tx, bias):
  state = _init(cfg, tx)
  state["params"]["decoder"]["layers_1"]["mlp"]["expert_bias"] = jnp.asarray(bias, jnp.float32)
  return state


def _router_logits(cfg, params, batch):
  """The MoE layer's router logits [G, T, E] of the forward pass (flax captured them)."""
  from openmoe_jax.model.transformer import Transformer
  _, inter = jax.jit(lambda params, batch: Transformer(cfg).apply(
      {"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
      batch["decoder_segment_ids"], batch["decoder_positions"], deterministic=False,
      capture_intermediates=lambda m, _: type(m).__name__ == "Router",
      mutable=["intermediates"]))(params, batch)
  return np.asarray(inter["intermediates"]["decoder"]["layers_1"]["mlp"]["router"]["__call__"][0],
                    np.float64)


def test_the_bias_moves_by_the_rule_from_the_steps_own_choices_and_is_not_trained():
  tx, schedule = make_optimizer("adamw", base_learning_rate=1e-2, warmup_steps=1, decay_steps=10)
  bias = np.array([0.3, -0.2, 0.0, 0.1], np.float32)
  state, batch = _state(CFG, tx, bias), _batch()
  # The optimizer holds nothing for the bias: its state is that of the other parameters.
  no_bias = jax.eval_shape(lambda: steps.init_state(
      CFG.replace(expert_bias=False, expert_bias_update_rate=0.0), tx, jax.random.key(0), 8, 16))
  assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(no_bias["opt_state"])

  # Independent count: sigmoid scores + bias, top-2 per real token, in float64.
  logits = _router_logits(CFG, state["params"], batch)
  scores = 1 / (1 + np.exp(-logits)) + bias
  top2 = np.argsort(-scores, axis=-1, kind="stable")[..., :2]
  real = np.asarray(batch["decoder_input_tokens"] > 0) | np.asarray(batch["decoder_target_tokens"] > 0)
  real[:, 0] = True  # the logit mask keeps each row's BOS
  counts = np.zeros(4)
  for e in range(4):
    counts[e] = ((top2 == e).any(-1).reshape(-1) * real.reshape(-1)).sum()
  want = bias + RATE * np.sign(counts.mean() - counts)

  new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, cfg=CFG, tx=tx,
                                                       schedule=schedule))(state, batch)
  got = np.asarray(new["params"]["decoder"]["layers_1"]["mlp"]["expert_bias"])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert float(metrics["moe/expert_bias_abs_max"]) == pytest.approx(np.abs(want).max())
  assert "moe/expert_counts_per_layer" not in metrics

  # No gradient reaches the bias; the other parameters' update is the optimizer's from the
  # gradient of the loss at the biased choice.
  def loss_fn(p):
    return steps._forward(CFG, p, batch, deterministic=False,
                          rng=jax.random.fold_in(jax.random.key(0), 0))[0]

  @jax.jit
  def hand_update(state):
    grads = jax.grad(loss_fn)(state["params"])
    trained = expert_bias.trainable(state["params"])
    updates, _ = tx.update(expert_bias.trainable(grads), state["opt_state"], trained)
    return grads, optax.apply_updates(trained, updates)
  grads, want_params = hand_update(state)
  assert not np.asarray(grads["decoder"]["layers_1"]["mlp"]["expert_bias"]).any()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               expert_bias.trainable(new["params"]), want_params)


def test_the_update_moves_a_skewed_router_towards_balance():
  """Fixed logits favouring expert 0 (its load 2.5x the mean): 200 updates of the rule bring
  the load's coefficient of variation below a fifth of where it started; the gates stay the
  unbiased scores."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 64, 8)) + np.array([2.0, 1.0, 0.5, 0, 0, 0, -0.5, -1.0])
  logits = jnp.asarray(logits, jnp.float32)
  route = jax.jit(lambda b: routing.top_k_routing(logits, 2, 64, score="sigmoid",
                                                  expert_bias=b))
  cv = lambda c: float(np.std(c) / np.mean(c))
  bias = jnp.zeros(8)
  counts0 = np.asarray(jnp.sum(jax.nn.one_hot(route(bias).expert_index, 8), axis=(0, 1, 2)))
  for _ in range(200):
    counts = jnp.sum(jax.nn.one_hot(route(bias).expert_index, 8), axis=(0, 1, 2))
    bias = expert_bias.updated({expert_bias.layer_path(0): bias}, counts[None], 1e-2,
                               [0])[expert_bias.layer_path(0)]
  final = route(bias)
  counts = np.asarray(jnp.sum(jax.nn.one_hot(final.expert_index, 8), axis=(0, 1, 2)))
  assert cv(counts0) > 0.6 and cv(counts) < cv(counts0) / 5, (cv(counts0), cv(counts))
  picked = np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)), np.asarray(final.expert_index), -1)
  np.testing.assert_allclose(np.asarray(final.combine_weights), picked, rtol=1e-6)


def test_the_bias_on_a_data_expert_mesh_equals_one_device():
  """Three train steps on a (data 2, expert 4) mesh: the counts are global (over both data
  shards), so the bias is identical to one device's and the losses equal."""
  cfg = CFG.replace(num_experts=8, expert_bias_update_rate=0.05)
  tx, schedule = make_optimizer("adamw", base_learning_rate=1e-2, warmup_steps=1, decay_steps=10)
  one = _init(cfg, tx)
  batches = [_batch(seed=s) for s in range(3)]
  step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, tx=tx, schedule=schedule))
  mesh = part.make_mesh(num_expert_partitions=4, devices=jax.devices()[:8])
  init_fn = lambda rng: steps.init_state(cfg, tx, rng, 8, 16)
  state_sh, _ = state_layout.state_layout(init_fn, mesh, jax.random.key(0))
  sharded = jax.device_put(one, state_sh)
  batch_sh = part.batch_sharding(mesh)
  mesh_step = state_layout.jit_train_step(cfg, tx, schedule, state_sh, batch_sh)
  path = ("decoder", "layers_1", "mlp", "expert_bias")
  get = lambda s: np.asarray(s["params"][path[0]][path[1]][path[2]][path[3]])
  for b in batches:
    one, m1 = step(one, b)
    with jax.set_mesh(mesh):
      sharded, m8 = mesh_step(sharded, jax.device_put(b, batch_sh))
    np.testing.assert_array_equal(get(sharded), get(one))
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
  assert np.abs(get(one)).max() > 0


@pytest.mark.parametrize("changes,needle", [
    (dict(expert_bias_update_rate=-1e-3), "expert_bias_update_rate must be >= 0"),
    (dict(expert_bias_update_rate=1e-3, router="experts_choose"), "every expert takes C tokens"),
])
def test_bad_bias_settings_are_refused(changes, needle):
  with pytest.raises(ValueError) as e:
    ModelConfig(**changes)
  assert needle in str(e.value)


def test_the_rate_implies_the_bias_and_the_bias_is_part_of_the_model_shape():
  from openmoe_jax.interop.hf import name_map
  assert ModelConfig(expert_bias_update_rate=1e-3).expert_bias
  assert not ModelConfig().expert_bias
  assert name_map.shape_mismatch(ModelConfig(expert_bias_update_rate=1e-3), ModelConfig()) == [
      "expert_bias: True != False"]
  # A trained bias kept fixed: the same shapes as the run that trained it.
  assert name_map.shape_mismatch(ModelConfig(expert_bias_update_rate=1e-3),
                                 ModelConfig(expert_bias=True)) == []
  # openmoe-info counts weights: the bias (state, like transformers' DeepSeek-V3 buffer) is not one.
  from openmoe_jax.model import counts
  with_bias, without = (counts.summarize(ModelConfig(expert_bias=b)) for b in (True, False))
  assert with_bias["total_params"] == without["total_params"]
  assert with_bias["train_flops_per_token"] == without["train_flops_per_token"]


def test_the_bias_steers_evaluation_and_decoding():
  """Evaluation and cached decoding read the bias as the training step does: a large bias on
  one expert moves every token's choice to it (the logits change) and greedy decoding runs."""
  from openmoe_jax.evaluation import decoding
  from openmoe_jax.model.transformer import Transformer
  cfg = CFG.replace(no_drop=True)
  tokens = _batch()["decoder_input_tokens"]
  params = _init(cfg, optax.sgd(0.1))["params"]
  forward = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0])
  biased = jax.tree.map(lambda x: x, params)
  biased["decoder"]["layers_1"]["mlp"]["expert_bias"] = jnp.array([0.0, 0.0, 0.0, 10.0])
  assert np.abs(np.asarray(forward(biased)) - np.asarray(forward(params))).max() > 1e-4
  out = decoding.generate(biased, cfg, [[5, 6, 7]], max_new_tokens=3)
  assert len(out) == 1 and len(out[0].ids) <= 3 and np.isfinite(out[0].log_probs).all()
