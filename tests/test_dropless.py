"""Dropless and adaptive capacity (issue 8): grouped FFN, ragged dispatch, expert-parallel
exchange, and the drop-aware capacity options, against float64 loops and the capacity path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.model import grouped
from openmoe_jax.model import ragged_dispatch
from openmoe_jax.model import routing
from openmoe_jax.model import partitioning as part
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer, compute_loss
from openmoe_jax.model.moe import MoeLayer
import reference

CFG = ModelConfig(emb_dim=16, expert_mlp_dim=24, num_experts=8, num_selected_experts=2,
                  num_layers=1, num_sparse_layers=1, group_size=16, activation_dtype="float32",
                  min_expert_capacity=1, eval_capacity_factor=1.0, train_capacity_factor=1.0)


def _weights(e, d, f, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (e, d, 2 * f)) / np.sqrt(d),
          jax.random.normal(ks[1], (e, d, f)) / np.sqrt(d),
          jax.random.normal(ks[2], (e, f, d)) / np.sqrt(f))


# --- grouped expert FFN ---------------------------------------------------------------------

@pytest.mark.parametrize("impl,block", [("blocked", 4), ("blocked", 16), ("ragged_dot", 0)])
def test_grouped_ffn_matches_loop_with_empty_experts_and_padding(impl, block):
  sizes = np.array([7, 0, 20, 3, 12])  # 42 rows in use, 8 padding rows
  w = _weights(5, 8, 6)
  x = jax.random.normal(jax.random.key(1), (50, 8))
  y = grouped.expert_ffn(x, jnp.asarray(sizes), *w, impl=impl, block_rows=block)
  xs, ws = np.asarray(x, np.float64), [np.asarray(a, np.float64) for a in w]
  want = np.zeros_like(xs)
  expert = np.repeat(np.arange(5), sizes)
  for r, e in enumerate(expert):
    want[r] = reference.ffn(xs[r], ws[0][e], ws[1][e], ws[2][e])
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)  # float32 vs float64


@pytest.mark.parametrize("block", [4, 16])  # 16: full tiles, then 8-row tail tiles
def test_blocked_gradients_equal_per_expert_autodiff(block):
  sizes = jnp.array([9, 0, 1, 22])
  w = _weights(4, 8, 6, seed=3)
  x = jax.random.normal(jax.random.key(4), (36, 8))
  ct = jax.random.normal(jax.random.key(5), (36, 8))

  def per_expert(x, w0, w1, wo):  # plain slices, one dense FFN per expert, zeros for padding
    out, start = [], 0
    for e, n in enumerate(np.asarray(sizes)):
      xe = x[start:start + n]
      out.append(grouped.gated_activation(xe @ w0[e], xe @ w1[e]) @ wo[e])
      start += n
    return jnp.concatenate(out + [jnp.zeros((x.shape[0] - start, x.shape[1]))])

  grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2, 3))(x, *w)
  want = grad(per_expert)
  got = grad(lambda *a: grouped.expert_ffn(a[0], sizes, *a[1:], impl="blocked",
                                           block_rows=block))
  for g, h in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-5, rtol=1e-5)


def test_take_rows_gradient_is_the_inverse_gather():
  x = jax.random.normal(jax.random.key(0), (5, 3))
  idx = jnp.array([4, 0, 5, 0, 2])          # row 0 read twice, 5 = the zero row
  inv = jnp.array([[1, 3], [5, 5], [4, 5], [5, 5], [0, 5]])
  ct = jax.random.normal(jax.random.key(1), (5, 3))
  got = jax.grad(lambda a: jnp.sum(ragged_dispatch.take_rows(a, idx, inv) * ct))(x)
  want = jax.grad(lambda a: jnp.sum(jnp.concatenate([a, jnp.zeros((1, 3))])[idx] * ct))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(ragged_dispatch.take_rows(a, idx, inv))))(x))
  assert "scatter" not in jaxpr


# --- the MoE layer -----------------------------------------------------------------------------

def _layer(cfg, x, params=None, deterministic=True):
  layer = MoeLayer(cfg)
  mask = jnp.ones(x.shape[:2], bool)
  if params is None:
    params = part.unbox(layer.init(jax.random.key(1), x, mask, deterministic=True))["params"]
    params = jax.tree.map(lambda a: a * 20 if a.shape == (cfg.emb_dim, cfg.num_experts) else a,
                          params)

  def loss(prm, xx):
    y, metrics, r = layer.apply({"params": prm}, xx, mask, deterministic=deterministic,
                                return_routing=True, rngs={"dropout": jax.random.key(7)})
    return jnp.sum(jnp.sin(y)), (y, metrics, r)

  (_, (y, metrics, r)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return params, y, metrics, r, grads


def _assert_trees_close(a, b, tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_dropless_equals_capacity_path_with_room_for_everything(impl):
  x = jax.random.normal(jax.random.key(0), (2, 16, CFG.emb_dim))
  params, y0, _, _, g0 = _layer(CFG.replace(no_drop=True), x)
  _, y1, m1, r1, g1 = _layer(CFG.replace(capacity_mode="dropless", grouped_matmul=impl), x, params)
  assert bool(r1.kept.all()) and float(m1.dropped_fraction) == 0.0
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-5, rtol=1e-5)
  _assert_trees_close(g1, g0, 1e-5)


def _all_to_two_experts(cfg, x):
  """Router weights sending every token to experts 0 (first) and 1 (second)."""
  x = x.at[..., 0].set(1.0 + jnp.abs(x[..., 0]))
  params = part.unbox(MoeLayer(cfg).init(jax.random.key(1), x, jnp.ones(x.shape[:2], bool),
                                         deterministic=True))["params"]
  kernel = np.zeros((cfg.emb_dim, cfg.num_experts), np.float32)
  kernel[0, 0], kernel[0, 1] = 50.0, 25.0
  params["router"]["router_weights"]["w"]["kernel"] = jnp.asarray(kernel)
  return x, params


def test_dropless_never_drops_even_when_every_token_picks_the_same_experts():
  cfg = CFG.replace(capacity_mode="dropless")
  x, params = _all_to_two_experts(cfg, jax.random.normal(jax.random.key(2), (2, 16, cfg.emb_dim)))
  _, y, metrics, r, _ = _layer(cfg, x, params)
  assert np.all(np.asarray(r.expert_index)[..., 0] == 0)
  assert float(metrics.dropped_fraction) == 0.0 and bool(r.kept.all())
  _, _, fixed, _, _ = _layer(CFG, x, params)
  assert float(fixed.dropped_fraction) > 0.5  # the capacity path drops most of them
  ex = jax.tree.map(lambda a: np.asarray(a, np.float64), params["expert"])
  groups = routing.num_groups(32, cfg.group_size, cfg.num_experts)
  want = reference.combine_loop(np.asarray(x).reshape(groups, -1, cfg.emb_dim),
                                np.asarray(r.expert_index), np.asarray(r.combine_weights),
                                np.asarray(r.kept), ex["wi_0"]["kernel"], ex["wi_1"]["kernel"],
                                ex["wo"]["kernel"])
  np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), atol=2e-5, rtol=2e-5)


# --- on meshes -------------------------------------------------------------------------------

MESH_CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                       expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                       group_size=32, activation_dtype="float32", no_drop=True)
TOKENS = jax.random.randint(jax.random.key(0), (8, 32), 1, 64)


def _model_loss(cfg, mesh=None, params=None):
  def loss(p, t):
    logits, moe = Transformer(cfg).apply({"params": p}, t, t, deterministic=False,
                                         rngs={"dropout": jax.random.key(3)})
    return compute_loss(cfg, logits, moe, t, jnp.ones(t.shape))[0], moe.dropped_fraction
  if params is None:
    params = part.unbox(Transformer(cfg).init(jax.random.key(1), TOKENS)["params"])
  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    return params, fn(params, TOKENS)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    return params, fn(params, jax.device_put(TOKENS, part.batch_sharding(mesh)))


@pytest.fixture(scope="module")
def single_device_capacity():
  return _model_loss(MESH_CFG.replace(num_expert_replicas=2))


@pytest.mark.parametrize("expert,model", [(8, 1), (4, 1), (2, 2), (1, 2)])
def test_dropless_on_meshes_equals_single_device_capacity_path(single_device_capacity, expert,
                                                               model):
  params, ((loss0, _), grads0) = single_device_capacity
  mesh = part.make_mesh(expert, model)
  # Same routing groups everywhere: replicas fixed at 2 (train sets it to the data size).
  cfg = MESH_CFG.replace(no_drop=False, capacity_mode="dropless", num_expert_replicas=2)
  _, ((loss1, dropped), grads1) = _model_loss(cfg, mesh, params)
  assert float(jnp.max(dropped)) == 0.0
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  _assert_trees_close(grads1, grads0, 2e-5)


def test_expert_parallel_buffer_overflow_is_reported_as_drops():
  """All tokens to experts 0 and 1 on an 8-way expert mesh with a 1x balanced buffer: each
  device can send only a quarter of its assignments' rows to expert 0's and expert 1's shards."""
  cfg = CFG.replace(capacity_mode="dropless", group_size=32, num_expert_replicas=1)
  x, params = _all_to_two_experts(cfg, jax.random.normal(jax.random.key(2), (16, 32, 16)))
  mesh = part.make_mesh(8, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    fn = jax.jit(lambda p, a, c: _layer(c, a, p)[1:4], static_argnums=2)
    x_sharded = jax.device_put(x, part.batch_sharding(mesh, 3))
    y_full, m_full, _ = fn(params, x_sharded, cfg)
    y, metrics, r = fn(params, x_sharded, cfg.replace(ep_buffer_factor=1.0))
  assert float(m_full.dropped_fraction) == 0.0
  # 64 tokens per device -> 128 assignments; chunk = 128 / 8 = 16 rows per destination, while 64
  # rows want each of shards 0 and 1: 2 * 16 of 128 kept.
  np.testing.assert_allclose(float(metrics.dropped_fraction), 1 - 32 / 128, atol=1e-6)
  kept = np.asarray(r.kept)
  assert kept.sum() == 8 * 32  # 8 devices x 32 rows
  # What was kept was computed exactly: equal to the local dropless layer with the same mask.
  groups = routing.num_groups(16 * 32, cfg.group_size, cfg.num_experts)
  ex = jax.tree.map(lambda a: np.asarray(a, np.float64), params["expert"])
  want = reference.combine_loop(np.asarray(x).reshape(groups, -1, 16), np.asarray(r.expert_index),
                                np.asarray(r.combine_weights), kept, ex["wi_0"]["kernel"],
                                ex["wi_1"]["kernel"], ex["wo"]["kernel"])
  np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), atol=2e-5, rtol=2e-5)
  assert not np.allclose(np.asarray(y), np.asarray(y_full))


def test_dropless_dropout_runs_sharded_and_changes_outputs():
  cfg = MESH_CFG.replace(no_drop=False, capacity_mode="dropless", dropout_rate=0.5,
                         num_expert_replicas=2)
  mesh = part.make_mesh(4, 2)
  params, ((loss, _), grads) = _model_loss(cfg, mesh)
  _, ((loss_eval, _), _) = _model_loss(cfg.replace(dropout_rate=0.0), mesh, params)
  assert np.isfinite(float(loss)) and float(loss) != float(loss_eval)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# --- drop-aware capacity options ---------------------------------------------------------------

def _imbalanced_logits(groups=64, tokens=64, experts=8, seed=0):
  """Expert 0 is every token's first choice: capacity binds and something must be dropped."""
  logits = jax.random.normal(jax.random.key(seed), (groups, tokens, experts))
  return logits.at[..., 0].add(4.0)


def _drop_rate_by_quarter(r):
  dropped = 1.0 - np.asarray(r.kept, np.float64)[..., 0]  # first choices
  return dropped.reshape(dropped.shape[0], 4, -1).mean(axis=(0, 2))


def test_openmoe_order_drops_towards_the_end_and_position_independent_orders_do_not():
  logits = _imbalanced_logits()
  capacity = 24  # ~60 of 64 first choices go to expert 0
  openmoe = _drop_rate_by_quarter(routing.top_k_routing(logits, 2, capacity))
  assert openmoe[0] == 0.0 and openmoe[-1] > 0.95  # kept left to right until expert 0 is full
  for order in ("random", "confidence"):
    r = routing.top_k_routing(logits, 2, capacity, order=order, rng=jax.random.key(1))
    rates = _drop_rate_by_quarter(r)
    assert rates.max() - rates.min() < 0.15, (order, rates)  # flat across positions
    assert abs(rates.mean() - openmoe.mean()) < 1e-9  # the same number of drops, elsewhere
    first = np.asarray(r.expert_index)[..., 0] == 0
    kept = (np.asarray(r.kept)[..., 0] & first).sum(axis=1)
    np.testing.assert_array_equal(kept, np.minimum(first.sum(axis=1), capacity))


def test_confidence_order_keeps_the_highest_gates():
  logits = _imbalanced_logits(groups=4, tokens=32)
  r = routing.top_k_routing(logits, 2, 8, order="confidence")
  gates = np.asarray(jax.nn.softmax(logits, -1))[..., 0]
  kept = np.asarray(r.kept)[..., 0]
  for g in range(4):
    assert set(np.flatnonzero(kept[g])) == set(np.argsort(-gates[g], kind="stable")[:8])


def test_priority_positions_follow_the_given_order_against_a_loop():
  index = jax.random.randint(jax.random.key(0), (3, 10, 2), 0, 4)
  order = jnp.stack([jnp.stack([jax.random.permutation(jax.random.key(g * 2 + k), 10)
                                for k in range(2)]) for g in range(3)]).astype(jnp.int32)
  got = np.asarray(routing.priority_positions(index, 4, order))
  idx, ordr = np.asarray(index), np.asarray(order)
  for g in range(3):
    count = np.zeros(4, int)
    for k in range(2):
      for t in ordr[g, k]:
        assert got[g, t, k] == count[idx[g, t, k]]
        count[idx[g, t, k]] += 1


def test_adaptive_capacities_are_water_filling():
  rng = np.random.default_rng(0)
  for _ in range(20):
    e, t = 6, int(rng.integers(4, 40))
    probs = rng.dirichlet(np.full(e, 0.3))
    index = np.stack([rng.choice(e, size=2, replace=False, p=probs) for _ in range(t)])[None]
    budget = int(rng.integers(1, 2 * t + 4))
    caps = np.asarray(routing.adaptive_capacities(jnp.asarray(index, jnp.int32), e, budget))[0]
    load = np.bincount(index.reshape(-1), minlength=e)
    np.testing.assert_array_equal(caps, reference.water_fill(load, budget))


def test_adaptive_layer_drops_less_than_fixed_at_the_same_compute_and_matches_a_loop():
  cfg = CFG.replace(train_capacity_factor=2.0, eval_capacity_factor=2.0)  # E*C = 2T: all fit
  x = jax.random.normal(jax.random.key(5), (4, 16, cfg.emb_dim))
  params, _, fixed, _, _ = _layer(cfg, x)
  _, y, adaptive, r, _ = _layer(cfg.replace(capacity_mode="adaptive"), x, params)
  assert float(fixed.dropped_fraction) > 0.05
  assert float(adaptive.dropped_fraction) == 0.0
  tight = cfg.replace(capacity_mode="adaptive", eval_capacity_factor=0.75)
  _, y, m, r, _ = _layer(tight, x, params)
  _, _, m_fixed, _, _ = _layer(tight.replace(capacity_mode="fixed"), x, params)
  assert 0.0 < float(m.dropped_fraction) < float(m_fixed.dropped_fraction)
  groups = routing.num_groups(64, cfg.group_size, cfg.num_experts)
  kept = np.asarray(r.kept).sum(axis=(1, 2))
  capacity = routing.expert_capacity(64 // groups, 8, 0.75, min_capacity=1)
  assert (kept <= 8 * capacity).all()  # never more rows than the fixed path computes
  ex = jax.tree.map(lambda a: np.asarray(a, np.float64), params["expert"])
  want = reference.combine_loop(np.asarray(x).reshape(groups, 64 // groups, -1), np.asarray(r.expert_index),
                                np.asarray(r.combine_weights), np.asarray(r.kept),
                                ex["wi_0"]["kernel"], ex["wi_1"]["kernel"], ex["wo"]["kernel"])
  np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), atol=2e-5, rtol=2e-5)


def test_bad_routing_options_fail_at_construction():
  for field, value in (("capacity_mode", "bogus"), ("capacity_order", "lifo"),
                       ("grouped_matmul", "magic"), ("ep_buffer_factor", -1.0)):
    with pytest.raises(ValueError, match=field):
      CFG.replace(**{field: value})


@pytest.mark.slow
def test_training_loop_runs_dropless_by_one_gin_binding_on_an_expert_mesh(tmp_path):
  """The macro reaches the model through gin, and the shard_map path composes with the loop's
  microbatch scan and data-parallel gradient reduction (2 devices: expert=2)."""
  import json
  from test_train import _run
  r = _run(tmp_path, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3",
           "--gin.CAPACITY_MODE='dropless'", "--gin.NUM_EXPERT_PARTITIONS=2",
           "--gin.NUM_MICROBATCHES=2")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(row["moe/dropped_fraction"] == 0.0 and np.isfinite(row["loss"]) for row in rows)
  assert "CAPACITY_MODE = 'dropless'" in (tmp_path / "config.gin").read_text()


def test_dropless_expert_mesh_exchanges_rows_by_all_to_all_not_all_gather():
  import re
  from test_partitioning import CFG as PART_CFG, _sharded
  *_, hlo = _sharded(8, 1, PART_CFG.replace(capacity_mode="dropless"))
  assert len(re.findall(r"all-to-all(-start)?\(", hlo)) >= 4  # rows and expert ids, out and back
  assert not re.findall(r"all-gather(-start)?\(", hlo)


def test_adaptive_on_an_expert_mesh_equals_adaptive_on_one_device():
  cfg = MESH_CFG.replace(no_drop=False, capacity_mode="adaptive", num_expert_replicas=2,
                         train_capacity_factor=1.0, min_expert_capacity=1)  # the budget binds
  params, ((loss0, dropped0), grads0) = _model_loss(cfg)
  assert float(jnp.max(dropped0)) > 0.0
  _, ((loss1, dropped1), grads1) = _model_loss(cfg, part.make_mesh(4, 2), params)
  np.testing.assert_allclose(float(jnp.max(dropped1)), float(jnp.max(dropped0)), atol=1e-6)
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  _assert_trees_close(grads1, grads0, 2e-5)
