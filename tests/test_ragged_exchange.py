"""The ragged expert exchange (issue 26, part 2): `EXPERT_EXCHANGE='ragged'` for the dropless and
adaptive modes under expert parallelism. On CPU the algorithm runs over the emulated collective
(XLA:CPU has no ragged all-to-all) and equals the single-device layer; for a TPU topology libtpu
compiles the real one; runs refuse it where the backend lacks it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from openmoe_jax.errors import UsageError
from openmoe_jax.model import partitioning as part
from openmoe_jax.model import ragged_dispatch as rd
from openmoe_jax.model import routing
from openmoe_jax.planning import target
from openmoe_jax.planning import tpu
from openmoe_jax.training import run_setup
import reference
from test_dropless import CFG, MESH_CFG, _all_to_two_experts, _assert_trees_close, _layer
from test_dropless import _model_loss

needs_libtpu = pytest.mark.skipif(not tpu.libtpu_installed(),
                                  reason="needs libtpu (pip install 'openmoe_jax[tpu]')")


def test_emulated_collective_follows_jax_documented_example():
  """jax.lax.ragged_all_to_all's docstring example (axis of size 2), row for row."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  args = {  # per device: operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
      "operand": [[1, 2, 2], [3, 4, 0]], "output": [[0, 0, 0, 0], [0, 0, 0, 0]],
      "input_offsets": [[0, 1], [0, 1]], "send_sizes": [[1, 2], [1, 1]],
      "output_offsets": [[0, 0], [1, 2]], "recv_sizes": [[1, 1], [2, 1]]}
  arrays = [jax.device_put(jnp.asarray(np.asarray(v, np.int32).reshape(-1)),
                           jax.NamedSharding(mesh, P("x"))) for v in args.values()]
  fn = jax.jit(jax.shard_map(
      lambda *a: rd.emulated_ragged_all_to_all(*a, axis_name="x"), mesh=mesh,
      in_specs=(P("x"),) * 6, out_specs=P("x")))
  np.testing.assert_array_equal(np.asarray(fn(*arrays)).reshape(2, 4), [[1, 3, 0, 0],
                                                                        [2, 2, 4, 0]])


def test_auto_takes_ragged_where_the_backend_has_it_and_dense_on_cpu():
  assert rd.resolve_exchange("auto") == "dense"  # this CPU
  for platform in ("tpu", "gpu"):
    with target.compiling_for(platform):
      assert rd.resolve_exchange("auto") == "ragged"
  with target.compiling_for("tpu"):
    assert rd.resolve_exchange("dense") == "dense"


def test_a_forced_ragged_exchange_on_cpu_is_one_line_before_anything_runs():
  with pytest.raises(UsageError) as e:
    run_setup.build(MESH_CFG.replace(capacity_mode="dropless", expert_exchange="ragged"),
                    batch_size=8, seq_len=32, num_expert_partitions=4)
  msg = str(e.value)
  assert "EXPERT_EXCHANGE='ragged' needs jax.lax.ragged_all_to_all" in msg and "CPU" in msg
  assert "\n" not in msg
  with target.compiling_for("tpu"):  # where it exists, the same settings pass the checks
    rd.check_exchange(MESH_CFG.replace(expert_exchange="ragged"))


@pytest.fixture(scope="module")
def single_device_capacity():
  return _model_loss(MESH_CFG.replace(num_expert_replicas=2))


@pytest.mark.parametrize("expert,model", [(8, 1), (2, 2)])
def test_ragged_exchange_equals_the_single_device_layer(single_device_capacity, expert, model):
  """Loss and every gradient of the 2-layer model, dropless with the ragged exchange on an
  expert mesh, against the single-device capacity path with room for everything."""
  params, ((loss0, _), grads0) = single_device_capacity
  cfg = MESH_CFG.replace(no_drop=False, capacity_mode="dropless", num_expert_replicas=2,
                         expert_exchange="ragged")
  _, ((loss1, dropped), grads1) = _model_loss(cfg, part.make_mesh(expert, model), params)
  assert float(jnp.max(dropped)) == 0.0
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  _assert_trees_close(grads1, grads0, 2e-5)


def test_ragged_and_dense_exchanges_agree_in_bfloat16():
  """Same rows, same order within each expert: the bfloat16 layer gives the same outputs and
  gradients with either exchange (within bfloat16 rounding of the sums)."""
  cfg = CFG.replace(capacity_mode="dropless", group_size=32, num_expert_replicas=1,
                    activation_dtype="bfloat16")
  x = jax.random.normal(jax.random.key(4), (16, 32, 16))
  params = part.unbox(rd_layer_init(cfg, x))
  mesh = part.make_mesh(8, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    fn = jax.jit(lambda p, a, c: _layer(c, a, p)[1:], static_argnums=2)
    xs = jax.device_put(x, part.batch_sharding(mesh, 3))
    y0, _, _, g0 = fn(params, xs, cfg.replace(expert_exchange="dense"))
    y1, m1, _, g1 = fn(params, xs, cfg.replace(expert_exchange="ragged"))
  assert float(m1.dropped_fraction) == 0.0
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32),
                             atol=2e-2, rtol=2e-2)
  _assert_trees_close(g1, g0, 3e-2)


def rd_layer_init(cfg, x):
  from openmoe_jax.model.moe import MoeLayer
  return MoeLayer(cfg).init(jax.random.key(1), x, jnp.ones(x.shape[:2], bool),
                            deterministic=True)["params"]


def test_ragged_receive_buffer_pools_sources_and_reports_overflow_as_drops():
  """Every token to experts 0 and 1 on an 8-way expert mesh. Factor 0: the receive buffer is
  the worst case and nothing drops. Factor 1: each shard receives ceil(1 x 128) rows of the 512
  sent its way, filled in source order, so devices 0 and 1 keep everything and the others
  nothing; what was kept is computed exactly."""
  cfg = CFG.replace(capacity_mode="dropless", group_size=32, num_expert_replicas=1,
                    expert_exchange="ragged")
  x, params = _all_to_two_experts(cfg, jax.random.normal(jax.random.key(2), (16, 32, 16)))
  mesh = part.make_mesh(8, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    fn = jax.jit(lambda p, a, c: _layer(c, a, p)[1:4], static_argnums=2)
    xs = jax.device_put(x, part.batch_sharding(mesh, 3))
    y_full, m_full, r_full = fn(params, xs, cfg)
    y, metrics, r = fn(params, xs, cfg.replace(ep_buffer_factor=1.0))
  assert float(m_full.dropped_fraction) == 0.0 and bool(np.asarray(r_full.kept).all())
  assert rd.receive_rows(64, 2, 1, 8, 0.0) == 8 * 64 and rd.receive_rows(64, 2, 1, 8, 1.0) == 128
  np.testing.assert_allclose(float(metrics.dropped_fraction), 1 - 256 / 1024, atol=1e-6)
  kept = np.asarray(r.kept).reshape(8, -1)  # one row of groups per device
  assert kept[:2].all() and not kept[2:].any()
  groups = routing.num_groups(16 * 32, cfg.group_size, cfg.num_experts)
  ex = jax.tree.map(lambda a: np.asarray(a, np.float64), params["expert"])
  want = reference.combine_loop(np.asarray(x).reshape(groups, -1, 16), np.asarray(r.expert_index),
                                np.asarray(r.combine_weights), np.asarray(r.kept),
                                ex["wi_0"]["kernel"], ex["wi_1"]["kernel"], ex["wo"]["kernel"])
  np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), atol=2e-5, rtol=2e-5)


def test_adaptive_with_the_ragged_exchange_equals_adaptive_on_one_device():
  cfg = MESH_CFG.replace(no_drop=False, capacity_mode="adaptive", num_expert_replicas=2,
                         train_capacity_factor=1.0, min_expert_capacity=1)
  params, ((loss0, dropped0), grads0) = _model_loss(cfg)
  assert float(jnp.max(dropped0)) > 0.0
  _, ((loss1, dropped1), grads1) = _model_loss(cfg.replace(expert_exchange="ragged"),
                                               part.make_mesh(4, 2), params)
  np.testing.assert_allclose(float(jnp.max(dropped1)), float(jnp.max(dropped0)), atol=1e-6)
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  _assert_trees_close(grads1, grads0, 2e-5)


@needs_libtpu
def test_ragged_exchange_compiles_for_tpu_with_fewer_bytes_and_no_weight_all_gather():
  """The tiny dropless model on v4:2x2x1 (expert 4 x model 2): 'auto' takes the ragged
  exchange on TPU. Its HLO has ragged all-to-alls into the receive buffer (out) and into the A
  sorted rows (back), the same all-gathers and all-reduces as the dense exchange (none of expert
  weights), and
  of the dense exchange's fixed all-to-alls only the int32 counts and offsets remain."""
  import collections
  import re
  from openmoe_jax import gin_utils
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train`
  from openmoe_jax.planning import plan as tpu_plan
  gin_utils.parse_gin(["models/tiny.gin"], ["CAPACITY_MODE='dropless'"], finalize=False)
  cfg = gin_utils.model_config()
  plans = {ex: tpu_plan.plan(cfg.replace(expert_exchange=ex), "v4:2x2x1",
                             num_expert_partitions=4, num_model_partitions=2, batch_size=16,
                             seq_len=128, with_hlo=True) for ex in ("dense", "auto")}
  dense, ragged = plans["dense"], plans["auto"]
  assert ragged["expert_exchange"] == "ragged" and dense["expert_exchange"] == "dense"
  c0, c1 = dense["collectives"], ragged["collectives"]
  assert c1["ragged-all-to-all"]["count"] == 4 and c0["ragged-all-to-all"]["count"] == 0
  assert c1["all-gather"] == c0["all-gather"]
  # The receive buffers are typed as varying over the mesh (`move_rows`): a replicated-looking
  # buffer would add an all-reduce of each exchange's rows to the backward pass.
  assert c1["all-reduce"] == c0["all-reduce"]

  def ops(hlo, kind):
    return collections.Counter(re.findall(r"= (\w+)\[([0-9,]*)\][^ ]* " + kind + r"\(", hlo))
  # 16 x 128 tokens over 4 (data x expert) shards: N = 512, A = 1024 assignments per device.
  a, worst = 1024, rd.receive_rows(512, 2, cfg.num_experts // 4, 4, 0.0)
  assert sorted(int(dims.split(",")[0])
                for _, dims in ops(ragged["hlo"], "ragged-all-to-all").elements()
                ) == [a, a, worst, worst]
  gone = ops(dense["hlo"], "all-to-all") - ops(ragged["hlo"], "all-to-all")
  added = ops(ragged["hlo"], "all-to-all") - ops(dense["hlo"], "all-to-all")
  assert gone and all(dtype == "f32" or dtype == "s32" for dtype, _ in gone)
  assert any(dtype == "f32" for dtype, _ in gone)  # the rows' fixed chunks
  assert added and all(dtype == "s32" for dtype, _ in added)  # counts and offsets only
  assert c1["all-to-all"]["bytes"] < 0.2 * c0["all-to-all"]["bytes"]
  assert ragged["temp_bytes_per_device"] < dense["temp_bytes_per_device"]
