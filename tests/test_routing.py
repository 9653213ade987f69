"""Routing math against the float64 loop reference in tests/reference.py."""
import numpy as np
import pytest
import jax.numpy as jnp

from openmoe_jax.model import routing
import reference


def _logits(seed, g, t, e, scale=2.0):
  return np.random.default_rng(seed).normal(size=(g, t, e)).astype(np.float32) * scale


@pytest.mark.parametrize("k,capacity,renorm", [(2, 3, False), (1, 2, False), (2, 16, False),
                                               (2, 2, True), (3, 4, False)])
def test_top_k_routing_matches_reference(k, capacity, renorm):
  logits = _logits(0, 3, 16, 6)
  r = routing.top_k_routing(jnp.asarray(logits), k, capacity, renormalize_gates=renorm)
  ref = reference.route(logits, k, capacity, renorm)
  np.testing.assert_array_equal(np.asarray(r.expert_index), ref["index"])
  np.testing.assert_array_equal(np.asarray(r.position), ref["position"])
  np.testing.assert_array_equal(np.asarray(r.kept), ref["kept"])
  np.testing.assert_allclose(np.asarray(r.combine_weights), ref["combine"], atol=1e-6)
  np.testing.assert_allclose(float(r.aux_loss), ref["aux"], rtol=1e-5)
  np.testing.assert_allclose(float(r.router_z_loss), ref["z"], rtol=1e-5)


def test_priority_first_choices_before_second_choices_left_to_right():
  # Every token prefers expert 0 then expert 1; capacity 2: tokens 0,1 keep expert 0; the
  # second choices (expert 1) go to tokens 0,1 as well; tokens 2,3 are dropped entirely.
  logits = np.tile(np.array([5.0, 4.0, 0.0, 0.0], np.float32), (1, 4, 1))
  r = routing.top_k_routing(jnp.asarray(logits), 2, 2)
  np.testing.assert_array_equal(np.asarray(r.kept)[0], [[1, 1], [1, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(np.asarray(r.position)[0], [[0, 0], [1, 1], [2, 2], [3, 3]])
  # A late token's first choice beats an early token's second choice.
  logits = np.array([[[5.0, 4.0, 0.0], [0.0, 5.0, 4.0], [0.0, 4.0, 5.0]]], np.float32)
  r = routing.top_k_routing(jnp.asarray(logits), 2, 1)
  # expert 1: token1 first choice -> slot 0; token0's second choice (expert 1) -> slot 1: dropped.
  np.testing.assert_array_equal(np.asarray(r.kept)[0], [[1, 0], [1, 0], [1, 0]])


def test_gates_not_renormalised_by_default_and_softmax_over_all_experts():
  logits = _logits(1, 1, 8, 5)
  r = routing.top_k_routing(jnp.asarray(logits), 2, 8)
  probs = reference.softmax(logits.astype(np.float64))
  top2 = np.sort(probs, -1)[..., ::-1][..., :2]
  np.testing.assert_allclose(np.asarray(r.combine_weights), top2, rtol=1e-5)
  assert np.all(np.asarray(r.combine_weights).sum(-1) < 1.0)


def test_aux_loss_hand_built():
  # Uniform probabilities and perfectly balanced choices -> E^2 * mean(f * P) = k.
  e, t, k = 4, 8, 2
  probs = np.full((1, t, e), 1.0 / e)
  index = np.array([[[i % e, (i + 1) % e] for i in range(t)]])
  loss = routing.load_balancing_loss(jnp.asarray(probs), jnp.asarray(index))
  np.testing.assert_allclose(float(loss), k * 1.0, rtol=1e-6)
  # All tokens on experts 0/1 with all probability there: E^2 * (1*0.5 + 1*0.5)/E = E.
  probs = np.zeros((1, t, e)); probs[..., :2] = 0.5
  index = np.tile([0, 1], (1, t, 1))
  np.testing.assert_allclose(float(routing.load_balancing_loss(jnp.asarray(probs),
                                                               jnp.asarray(index))), e, rtol=1e-6)


def test_router_z_loss_hand_built():
  logits = np.zeros((1, 3, 4), np.float32)
  np.testing.assert_allclose(float(routing.router_z_loss(jnp.asarray(logits))), np.log(4.0)**2,
                             rtol=1e-6)


@pytest.mark.parametrize("tokens,group,experts,replicas,want", [
    (4096 * 512, 4096, 32, 1, 512),     # OpenMoE-8B: 1024 x 2048 tokens -> 512 groups of 4096
    (64, 4096, 8, 1, 8),                # fewer tokens than a group: E groups at least
    (96, 16, 4, 1, 8),                  # 96/16 = 6 -> next multiple of 4 dividing 96 is 8
    (96, 16, 4, 2, 8),
    (1000, 100, 8, 1, 40),              # 10 -> 16 does not divide 1000 -> 40
])
def test_num_groups(tokens, group, experts, replicas, want):
  n = routing.num_groups(tokens, group, experts, replicas)
  assert n == want
  assert tokens % n == 0 and n % (experts * replicas) == 0 and n >= tokens // group


def test_num_groups_impossible():
  with pytest.raises(ValueError, match="multiple of num_experts"):
    routing.num_groups(12, 4, 8)


def test_capacity_formulas():
  assert routing.expert_capacity(4096, 32, 1.25) == 160          # OpenMoE-8B training
  assert routing.expert_capacity(4096, 32, 2.0) == 256           # evaluation
  assert routing.expert_capacity(8, 8, 1.25) == 4                # min capacity
  assert routing.expert_capacity(4096, 32, 1.25, formula="colossalai") == 320
  assert routing.expert_capacity(4096, 32, 1.25, no_drop=True) == 4096
  assert routing.expert_capacity(20, 8, 1.25) == 4 and routing.expert_capacity(200, 8, 1.0) == 25
