"""The MoE sublayer against a plain float64 loop over tokens and experts (tests/reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.moe import MoeLayer
from openmoe_jax.model.partitioning import unbox
import reference

CFG = ModelConfig(emb_dim=16, expert_mlp_dim=24, num_experts=4, num_selected_experts=2,
                  num_layers=1, num_sparse_layers=1, group_size=16, activation_dtype="float32",
                  min_expert_capacity=1)


def _run(cfg, x, deterministic=True):
  layer = MoeLayer(cfg)
  mask = jnp.ones(x.shape[:2], bool)
  params = unbox(layer.init(jax.random.key(1), x, mask, deterministic=deterministic))
  # Spread the router so that routing is far from ties and capacity binds.
  params = jax.tree.map(lambda a: a * 20 if a.shape == (cfg.emb_dim, cfg.num_experts) else a,
                        params)
  y, metrics, r = layer.apply(params, x, mask, deterministic=deterministic, return_routing=True)
  return params["params"], y, metrics, r


def _reference(params, x, cfg, capacity):
  p = jax.tree.map(np.asarray, params)
  ex = p["expert"]
  n_groups = routing.num_groups(x.shape[0] * x.shape[1], cfg.group_size, cfg.num_experts)
  xg = np.asarray(x, np.float64).reshape(n_groups, -1, x.shape[-1])
  y, r = reference.moe(xg, p["router"]["router_weights"]["w"]["kernel"], ex["wi_0"]["kernel"],
                       ex["wi_1"]["kernel"], ex["wo"]["kernel"], cfg.num_selected_experts,
                       capacity, cfg.renormalize_gates)
  return y.reshape(x.shape), r


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
@pytest.mark.parametrize("cf,no_drop,deterministic", [(1.0, False, True), (0.5, False, False),
                                                      (1.0, True, True)])
def test_moe_matches_loop(dispatch, cf, no_drop, deterministic):
  cfg = CFG.replace(dispatch=dispatch, eval_capacity_factor=cf, train_capacity_factor=cf,
                    no_drop=no_drop)
  x = jax.random.normal(jax.random.key(0), (2, 16, cfg.emb_dim))
  params, y, metrics, r = _run(cfg, x, deterministic)
  group = 32 // routing.num_groups(32, cfg.group_size, cfg.num_experts)
  cap = routing.expert_capacity(group, cfg.num_experts, cf, min_capacity=1, no_drop=no_drop)
  assert r.capacity == cap
  want, ref = _reference(params, x, cfg, cap)
  np.testing.assert_array_equal(np.asarray(r.kept), ref["kept"])
  if no_drop:
    assert ref["kept"].all() and float(metrics.dropped_fraction) == 0.0
  else:
    assert not ref["kept"].all(), "capacity should bind in this case"
    np.testing.assert_allclose(float(metrics.dropped_fraction), 1 - ref["kept"].mean(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=2e-5)


def test_dropped_token_contributes_zero_and_gather_equals_einsum_gradients():
  cfg = CFG.replace(eval_capacity_factor=0.25)
  x = jax.random.normal(jax.random.key(3), (1, 32, cfg.emb_dim))
  params, y, _, r = _run(cfg.replace(dispatch="gather"), x)
  left_behind = ~np.asarray(r.kept).any(-1).reshape(-1)
  assert left_behind.any()
  np.testing.assert_array_equal(np.asarray(y).reshape(-1, cfg.emb_dim)[left_behind], 0.0)

  def loss(p, x, mode):
    out, _ = MoeLayer(cfg.replace(dispatch=mode)).apply({"params": p}, x,
                                                         jnp.ones(x.shape[:2], bool),
                                                         deterministic=True)
    return jnp.sum(jnp.sin(out))
  g1 = jax.grad(loss, argnums=(0, 1))(params, x, "gather")
  g2 = jax.grad(loss, argnums=(0, 1))(params, x, "einsum")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def test_metrics_expert_load_and_position_buckets():
  cfg = CFG.replace(eval_capacity_factor=0.5, position_buckets=4)
  x = jax.random.normal(jax.random.key(5), (2, 16, cfg.emb_dim))
  _, _, m, r = _run(cfg, x)
  np.testing.assert_allclose(float(m.expert_load.sum()), 1.0, rtol=1e-6)
  counts = np.bincount(np.asarray(r.expert_index).reshape(-1), minlength=cfg.num_experts)
  np.testing.assert_allclose(np.asarray(m.expert_load), counts / counts.sum(), rtol=1e-6)
  dropped = ~np.asarray(r.kept).reshape(2, 16, 2)
  want = [dropped[:, 4 * i:4 * i + 4].mean() for i in range(4)]
  np.testing.assert_allclose(np.asarray(m.dropped_by_position), want, rtol=1e-6)
