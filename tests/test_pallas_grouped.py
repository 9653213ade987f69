"""The Pallas (megablox) grouped expert FFN: interpret mode on CPU against the blocked kernel and
a float64 reference, forward and backward; and its TPU compilation (libtpu, compile only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.model import grouped
from openmoe_jax.model import pallas_grouped

N, D, F, E = 40, 16, 8, 4
SIZES = np.array([10, 0, 17, 9], np.int32)  # 36 rows; the last 4 are padding


def _inputs(seed=0, gate_width=2):
  """gate_width 2: OpenMoE's wi_0 [E, D, 2F]; 1: the gated (gate / up) layout's [E, D, F]."""
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (N, D), jnp.float32)
  w0 = jax.random.normal(ks[1], (E, D, gate_width * F), jnp.float32) / 4
  w1 = jax.random.normal(ks[2], (E, D, F), jnp.float32) / 4
  wo = jax.random.normal(ks[3], (E, F, D), jnp.float32) / 4
  ct = jax.random.normal(ks[4], (N, D), jnp.float32)
  return x, w0, w1, wo, ct


def _reference(x, w0, w1, wo):
  """float64, row by row: each row through its expert's weights; padding rows zero."""
  expert = np.repeat(np.arange(E), SIZES)
  rows = len(expert)
  h = _act(np.einsum("nd,ndf->nf", x[:rows], w0[expert]),
           np.einsum("nd,ndf->nf", x[:rows], w1[expert]), np)
  y = np.zeros_like(x)
  y[:rows] = np.einsum("nf,nfd->nd", h, wo[expert])
  return y


def _loss(fn, ct):
  return lambda x, w0, w1, wo: jnp.sum(fn(x, SIZES, w0, w1, wo) * ct)


def test_forward_matches_blocked_and_float64_reference():
  x, w0, w1, wo, _ = _inputs()
  y = pallas_grouped.expert_ffn(x, SIZES, w0, w1, wo, interpret=True)
  ref = _reference(*(np.asarray(a, np.float64) for a in (x, w0, w1, wo)))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  blocked = grouped.expert_ffn(x, SIZES, w0, w1, wo, impl="blocked")
  np.testing.assert_allclose(np.asarray(y), np.asarray(blocked), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(y)[SIZES.sum():])  # padding rows are zero


def _act(h0, h1, xnp):
  """The reference activation, written out per layout (xnp: numpy or jax.numpy)."""
  silu = lambda z: z / (1 + xnp.exp(-z))
  if h0.shape[-1] == h1.shape[-1]:
    return silu(h0) * h1
  a, b = xnp.split(h0, 2, axis=-1)
  return a * silu(b) * h1


@pytest.mark.parametrize("gate_width", [2, 1], ids=["openmoe", "gated"])
def test_gradients_match_blocked_and_float64_reference(gate_width):
  x, w0, w1, wo, ct = _inputs(1, gate_width)
  pallas = lambda *a: pallas_grouped.expert_ffn(*a, interpret=True)
  g = jax.grad(_loss(pallas, ct), argnums=(0, 1, 2, 3))(x, w0, w1, wo)
  gb = jax.grad(_loss(lambda *a: grouped.expert_ffn(*a, impl="blocked"), ct),
                argnums=(0, 1, 2, 3))(x, w0, w1, wo)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w0, w1, wo, ct)]

    def ref_loss(x, w0, w1, wo):
      expert = jnp.asarray(np.repeat(np.arange(E), SIZES))
      rows = expert.shape[0]
      h = _act(jnp.einsum("nd,ndf->nf", x[:rows], w0[expert]),
               jnp.einsum("nd,ndf->nf", x[:rows], w1[expert]), jnp)
      return jnp.sum(jnp.einsum("nf,nfd->nd", h, wo[expert]) * args64[4][:rows])

    g64 = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(*args64[:4])
    g64 = [np.asarray(a) for a in g64]
  for name, got, blocked, want in zip(("x", "wi_0", "wi_1", "wo"), g, gb, g64):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(np.asarray(got), np.asarray(blocked), rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_grouped_expert_ffn_dispatches_to_pallas():
  x, w0, w1, wo, _ = _inputs(2)
  y = grouped.expert_ffn(x, SIZES, w0, w1, wo, impl="pallas")  # interpret mode off TPU
  np.testing.assert_allclose(np.asarray(y),
                             _reference(*(np.asarray(a, np.float64) for a in (x, w0, w1, wo))),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not __import__("openmoe_jax.planning.tpu", fromlist=["x"]).libtpu_installed(),
                    reason="needs libtpu (pip install 'openmoe_jax[tpu]')")
def test_compiles_for_tpu_forward_and_backward():
  from openmoe_jax.planning import target
  from openmoe_jax.planning import tpu
  s = tpu.parse_slice("v5litepod-4")
  tpu.compile_host(s)
  device = tpu.slice_devices(s)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  n, d, f = 256, 128, 128  # Mosaic tiles: multiples of (8, 128)
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
            for s in ((n, d), (E, d, 2 * f), (E, d, f), (E, f, d))]
  sizes = jax.ShapeDtypeStruct((E,), jnp.int32, sharding=sharding)

  def loss(x, gs, w0, w1, wo):
    return jnp.sum(pallas_grouped.expert_ffn(x, gs, w0, w1, wo).astype(jnp.float32))

  with target.compiling_for("tpu"):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
    compiled = fn.lower(shapes[0], sizes, *shapes[1:]).compile()
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo  # the Mosaic kernels, not an interpreted loop


def test_dropless_model_on_an_expert_by_model_mesh_equals_blocked():
  """Under shard_map (expert 2 x model 2 x data 2 of the 8 CPU devices), forward and gradients."""
  import flax.linen as nn
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.model.config import ModelConfig
  from openmoe_jax.model.transformer import Transformer, compute_loss
  cfg = ModelConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                    expert_mlp_dim=64, num_layers=1, num_experts=4, num_sparse_layers=1,
                    group_size=32, activation_dtype="float32", capacity_mode="dropless",
                    num_expert_replicas=2)
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 1, 64)
  params = part.unbox(Transformer(cfg).init(jax.random.key(1), tokens)["params"])
  mesh = part.make_mesh(2, 2)

  def run(impl):
    c = cfg.replace(grouped_matmul=impl)

    def loss(p, t):
      logits, moe = Transformer(c).apply({"params": p}, t, t, deterministic=True)
      return compute_loss(c, logits, moe, t, jnp.ones(t.shape))[0]
    with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
      return jax.jit(jax.value_and_grad(loss))(params,
                                               jax.device_put(tokens, part.batch_sharding(mesh)))

  (loss_p, grads_p), (loss_b, grads_b) = run("pallas"), run("blocked")
  np.testing.assert_allclose(float(loss_p), float(loss_b), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_p)[0],
                          jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))
