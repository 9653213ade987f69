"""Expert-parallel sharding on 8 fake CPU devices: sharded == single device, layouts, collectives."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from openmoe_jax.model import partitioning as part
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer, compute_loss

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                  group_size=32, activation_dtype="float32", eval_capacity_factor=1.0,
                  train_capacity_factor=1.0)
TOKENS = jax.random.randint(jax.random.key(0), (8, 32), 1, 64)
MESHES = [(1, 1), (8, 1), (4, 1), (2, 2)]  # (expert, model); data takes the rest of 8 devices


def _loss(params, tokens, cfg=CFG):
  logits, moe = Transformer(cfg).apply({"params": params}, tokens, tokens, deterministic=False)
  return compute_loss(cfg, logits, moe, tokens, jnp.ones(tokens.shape))[0]


def _sharded(expert, model, cfg=CFG, values=None):
  """Sharded init (directly into its layout) or, given `values`, those values resharded."""
  mesh = part.make_mesh(expert, model)
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(lambda r: Transformer(cfg).init(r, TOKENS)["params"], jax.random.key(1))
    sh = part.mesh_shardings(boxed, mesh)
    if values is None:
      params = jax.jit(lambda r: part.unbox(Transformer(cfg).init(r, TOKENS)["params"]),
                       out_shardings=sh)(jax.random.key(1))
    else:
      params = jax.device_put(values, sh)
    fn = jax.jit(jax.value_and_grad(lambda p, t: _loss(p, t, cfg)),
                 in_shardings=(sh, part.batch_sharding(mesh)))
    tokens = jax.device_put(TOKENS, part.batch_sharding(mesh))
    loss, grads = fn(params, tokens)
    hlo = fn.lower(params, tokens).compile().as_text()
  return mesh, params, loss, grads, hlo


@pytest.fixture(scope="module")
def single():
  params = part.unbox(Transformer(CFG).init(jax.random.key(1), TOKENS)["params"])
  loss, grads = jax.jit(jax.value_and_grad(_loss))(params, TOKENS)
  return params, loss, grads


@pytest.mark.parametrize("expert,model", MESHES)
def test_loss_and_gradients_equal_single_device(single, expert, model):
  params0, loss0, grads0 = single
  mesh, params, _, _, _ = _sharded(expert, model)
  assert dict(mesh.shape) == {"data": 8 // (expert * model), "expert": expert, "model": model}
  # The sharded init draws the same numbers (threefry is partitionable).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                       atol=1e-7), params, params0)
  _, _, loss, grads, _ = _sharded(expert, model, values=params0)
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-7), grads, grads0)


def _spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def test_parameters_are_sharded_by_the_rules():
  mesh, params, _, _, _ = _sharded(2, 2)
  layer0, layer1 = params["decoder"]["layers_0"], params["decoder"]["layers_1"]
  assert _spec(layer1["mlp"]["expert"]["wi_0"]["kernel"]) == ("expert", None, "model")
  assert _spec(layer1["mlp"]["expert"]["wo"]["kernel"]) == ("expert", "model", None)
  assert _spec(layer1["mlp"]["router"]["router_weights"]["w"]["kernel"]) == (None, None)
  assert _spec(layer0["self_attention"]["query"]["kernel"]) == (None, "model")
  assert _spec(layer0["self_attention"]["out"]["kernel"]) == ("model", None)
  assert _spec(layer0["mlp"]["wi_0"]["kernel"]) == (None, "model")
  assert _spec(layer1["extra_mlp"]["wo"]["kernel"]) == ("model", None)
  assert _spec(params["decoder"]["logits_dense"]["kernel"]) == (None, "model")
  assert _spec(params["token_embedder"]["embedding"]) == ("model", None)
  # Each device holds 8 / 2 = 4 experts: several experts per shard.
  shard = layer1["mlp"]["expert"]["wi_0"]["kernel"].addressable_shards[0].data
  assert shard.shape == (4, 32, 64)


def test_dispatched_activations_carry_the_expert_axis_on_an_expert_only_mesh():
  mesh = part.make_mesh(8, 1)
  seen = {}

  def probe(params, tokens):
    out, state = Transformer(CFG).apply({"params": params}, tokens, tokens,
                                        capture_intermediates=lambda m, _: m.name == "expert",
                                        mutable=["intermediates"])
    return state["intermediates"]["decoder"]["layers_1"]["mlp"]["expert"]["__call__"][0]

  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(lambda r: Transformer(CFG).init(r, TOKENS)["params"], jax.random.key(1))
    sh = part.mesh_shardings(boxed, mesh)
    params = jax.jit(lambda r: part.unbox(Transformer(CFG).init(r, TOKENS)["params"]),
                     out_shardings=sh)(jax.random.key(1))
    out = jax.jit(probe)(params, jax.device_put(TOKENS, part.batch_sharding(mesh)))
  assert out.shape[0] == CFG.num_experts
  assert _spec(out)[0] == "expert"
  assert out.addressable_shards[0].data.shape[0] == 1


def test_expert_mesh_exchanges_tokens_by_all_to_all_not_all_gather():
  *_, hlo = _sharded(8, 1)
  assert len(re.findall(r"all-to-all(-start)?\(", hlo)) >= 2
  assert not re.findall(r"all-gather(-start)?\(", hlo)


def test_bad_meshes_fail_before_compilation_naming_the_numbers():
  with pytest.raises(ValueError, match=r"8 devices .* expert=3 x model=1"):
    part.make_mesh(3, 1)
  with pytest.raises(ValueError, match=r"expert=4 x model=4 .*=16 must divide 8"):
    part.make_mesh(4, 4)
  with pytest.raises(ValueError, match=r"NUM_EXPERTS=6 is not divisible by the expert partitions 4"):
    part.check_experts_divisible(6, part.make_mesh(4, 1))


def test_aot_compile_reports_memory_and_flops_and_enforces_a_budget():
  import json
  import subprocess
  import sys
  base = [sys.executable, "-m", "openmoe_jax.commands.info", "--gin_file=models/tiny.gin", "--compile",
          "--num_devices=8", "--num_expert_partitions=4", "--batch_size=16", "--seq_len=64",
          "--num_microbatches=2"]
  ok = subprocess.run(base, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  out = json.loads(ok.stdout)
  assert out["mesh"] == {"data": 2, "expert": 4, "model": 1}
  for key in ("argument_bytes_per_device", "output_bytes_per_device", "temp_bytes_per_device"):
    assert out[key] > 0
  # Parameters + Adafactor state are sharded: each device holds well under the whole model.
  assert out["argument_bytes_per_device"] < 4 * out["total_params"] * 2
  assert out["xla_flops_per_device"] > 0
  over = subprocess.run(base + ["--memory_budget_gib=0.0001"], capture_output=True, text=True,
                        timeout=300)
  assert over.returncode == 3 and "exceeds the budget" in over.stderr
  bad = subprocess.run(base[:-4] + ["--num_expert_partitions=3"], capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "expert=3" in bad.stderr


def test_fsdp_is_a_change_of_the_rules_table():
  rules = part.axis_rules(overrides=[("embed", "data")])
  mesh = part.make_mesh(2, 2)
  boxed = jax.eval_shape(lambda r: Transformer(CFG).init(r, TOKENS)["params"], jax.random.key(1))
  sh = part.mesh_shardings(boxed, mesh, rules)
  assert tuple(sh["decoder"]["layers_0"]["self_attention"]["query"]["kernel"].spec) == ("data", "model")
  assert tuple(sh["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"].spec) == ("expert", None, "model")
  with pytest.raises(ValueError, match="unknown logical axis 'nope'"):
    part.axis_rules(overrides=[("nope", "data")])
