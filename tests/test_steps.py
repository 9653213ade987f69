"""The pure train step: one step equals a hand-composed update; microbatching is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openmoe_jax.training import steps
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer, compute_loss
from openmoe_jax.training.optimizer import make_optimizer
from openmoe_jax.model.partitioning import unbox

CFG = ModelConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                  expert_mlp_dim=20, num_layers=2, num_experts=4, num_sparse_layers=1,
                  group_size=16, activation_dtype="float32", no_drop=True)


def _batch(b=4, length=16, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.integers(1, 64, (b, length)).astype(np.int32)
  return {"decoder_target_tokens": jnp.asarray(t),
          "decoder_input_tokens": jnp.asarray(np.pad(t[:, :-1], ((0, 0), (1, 0)))),
          "decoder_loss_weights": jnp.ones((b, length), jnp.float32),
          "decoder_segment_ids": jnp.ones((b, length), jnp.int32),
          "decoder_positions": jnp.broadcast_to(jnp.arange(length), (b, length)).astype(jnp.int32)}


def _state(tx, b=4):
  return unbox(steps.init_state(CFG, tx, jax.random.key(0), b, 16))


def test_one_step_equals_hand_composed_update():
  tx, schedule = make_optimizer("adafactor")
  state, batch = _state(tx), _batch()
  new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, cfg=CFG, tx=tx, schedule=schedule))(
      state, batch)

  def loss_fn(p):
    logits, moe = Transformer(CFG).apply({"params": p}, batch["decoder_input_tokens"],
                                         batch["decoder_target_tokens"],
                                         batch["decoder_segment_ids"], batch["decoder_positions"],
                                         deterministic=False)
    return compute_loss(CFG, logits, moe, batch["decoder_target_tokens"],
                        batch["decoder_loss_weights"])[0]
  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, _ = tx.update(grads, state["opt_state"], state["params"])
  want = optax.apply_updates(state["params"], updates)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-5)
  assert float(metrics["learning_rate"]) == pytest.approx(0.01)
  assert int(new["step"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               new["params"], want)


def test_microbatches_average_to_the_full_batch():
  # The load-balancing loss is a per-group statistic, and microbatches form smaller groups, so it
  # is switched off here; everything else must match exactly.
  cfg = CFG.replace(aux_loss_factor=0.0)
  tx, schedule = make_optimizer("adamw", base_learning_rate=1e-2, warmup_steps=1, decay_steps=10)
  state, batch = _state(tx), _batch()
  run = lambda n: jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, tx=tx, schedule=schedule,
                                                        num_microbatches=n))(state, batch)
  full, m1 = run(1)
  micro, m2 = run(2)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  assert float(m1["num_tokens"]) == float(m2["num_tokens"]) == 64
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               full["params"], micro["params"])


def test_eval_step_counts():
  tx, _ = make_optimizer("adafactor")
  state, batch = _state(tx), _batch()
  batch["decoder_loss_weights"] = batch["decoder_loss_weights"].at[:, -4:].set(0)
  out = steps.eval_step(state["params"], batch, cfg=CFG)
  assert float(out["weight"]) == 48
  logits, _ = Transformer(CFG).apply({"params": state["params"]}, batch["decoder_input_tokens"],
                                     batch["decoder_target_tokens"])
  acc = (np.argmax(np.asarray(logits), -1) == np.asarray(batch["decoder_target_tokens"]))[:, :-4]
  assert float(out["correct"]) == acc.sum()
