"""The full decoder: float64 reference, causality, packing isolation, RoPE, names, losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.layers import apply_rope
from openmoe_jax.model.transformer import Transformer, compute_loss
from openmoe_jax.model.partitioning import unbox
import reference

CFG = ModelConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                  expert_mlp_dim=20, num_layers=4, num_experts=4, num_sparse_layers=2,
                  group_size=8, activation_dtype="float32", min_expert_capacity=1,
                  eval_capacity_factor=1.0)


def _init(cfg, b=2, length=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, length), 1, cfg.vocab_size)
  params = unbox(Transformer(cfg).init(jax.random.key(seed + 1), tokens))["params"]
  return params, tokens


def _apply(cfg, params, tokens, **kw):
  return Transformer(cfg).apply({"params": params}, tokens, **kw)


def test_forward_matches_float64_reference_with_drops_and_packing():
  cfg = CFG
  params, tokens = _init(cfg)
  # Sharpen the routers so capacity binds; pack two sequences in row 0 and pad row 1's tail.
  for i in cfg.moe_layers:
    k = params["decoder"][f"layers_{i}"]["mlp"]["router"]["router_weights"]["w"]
    k["kernel"] = k["kernel"] * 30
  tokens = tokens.at[0, 4].set(0).at[1, 6:].set(0)
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[0, 3].set(0).at[1, 5:].set(0)
  targets = jnp.where(segments > 0, jnp.maximum(targets, 1), 0)
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0]])
  logits, metrics = _apply(cfg, params, tokens, decoder_target_tokens=targets,
                           decoder_segment_ids=segments, decoder_positions=positions)
  groups = routing.num_groups(16, cfg.group_size, cfg.num_experts)
  cap = routing.expert_capacity(16 // groups, cfg.num_experts, cfg.eval_capacity_factor,
                                min_capacity=1)
  want = reference.forward(jax.tree.map(np.asarray, params), cfg, np.asarray(tokens),
                           np.asarray(positions), np.asarray(segments), np.asarray(targets),
                           capacity=cap, group_tokens=16 // groups)
  assert float(np.max(np.asarray(metrics.dropped_fraction))) > 0, "capacity should bind"
  real = np.asarray(targets) > 0
  np.testing.assert_allclose(np.asarray(logits)[real], want[real], atol=1e-4, rtol=1e-4)


def test_causality_changing_a_later_token_never_changes_earlier_outputs():
  cfg = CFG.replace(no_drop=True)  # with capacity, routing of later tokens can evict earlier ones
  params, tokens = _init(cfg, b=1, length=16)
  base, _ = _apply(cfg, params, tokens)
  for t in (5, 11):
    changed, _ = _apply(cfg, params, tokens.at[0, t].set((tokens[0, t] + 7) % cfg.vocab_size + 1))
    np.testing.assert_allclose(np.asarray(changed)[0, :t], np.asarray(base)[0, :t], atol=1e-5)
    assert not np.allclose(np.asarray(changed)[0, t], np.asarray(base)[0, t])


def test_packed_segments_are_isolated():
  cfg = CFG.replace(no_drop=True)
  params, tokens = _init(cfg, b=1, length=16)
  seg = jnp.array([[1] * 8 + [2] * 8])
  pos = jnp.array([list(range(8)) * 2])
  packed, _ = _apply(cfg, params, tokens, decoder_segment_ids=seg, decoder_positions=pos)
  alone, _ = _apply(cfg, params, tokens[:, 8:])
  np.testing.assert_allclose(np.asarray(packed)[0, 8:], np.asarray(alone)[0], atol=1e-4)
  other = tokens.at[0, :8].set(3)
  packed2, _ = _apply(cfg, params, other, decoder_segment_ids=seg, decoder_positions=pos)
  np.testing.assert_allclose(np.asarray(packed2)[0, 8:], np.asarray(packed)[0, 8:], atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  def score(pq, pk):
    return float(jnp.sum(apply_rope(q, jnp.array([[pq]]), 1e4) * apply_rope(k, jnp.array([[pk]]), 1e4)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
  want = (reference.rope(np.asarray(q[0], np.float64), np.array([5])))
  np.testing.assert_allclose(np.asarray(apply_rope(q, jnp.array([[5]]), 1e4))[0], want, atol=1e-5)


def test_parameter_names_mirror_flaxformer():
  params, _ = _init(CFG)
  flat = traverse_util.flatten_dict(params, sep="/")
  names = set(flat)
  assert "token_embedder/embedding" in names
  assert "decoder/decoder_norm/scale" in names and "decoder/logits_dense/kernel" in names
  for i in range(CFG.num_layers):
    pre = f"decoder/layers_{i}/"
    for n in ("query", "key", "value", "out"):
      assert pre + f"self_attention/{n}/kernel" in names
    if CFG.is_moe_layer(i):
      assert flat[pre + "mlp/router/router_weights/w/kernel"].shape == (16, 4)
      assert flat[pre + "mlp/expert/wi_0/kernel"].shape == (4, 16, 40)
      assert flat[pre + "mlp/expert/wi_1/kernel"].shape == (4, 16, 20)
      assert flat[pre + "mlp/expert/wo/kernel"].shape == (4, 20, 16)
      assert flat[pre + "extra_mlp/wi_0/kernel"].shape == (16, 48)
      assert pre + "pre_extra_mlp_layer_norm/scale" in names
    else:
      assert flat[pre + "mlp/wi_0/kernel"].shape == (16, 48)
      assert pre + "pre_extra_mlp_layer_norm/scale" not in names
  assert CFG.moe_layers == (1, 3)
  assert flat["decoder/layers_0/self_attention/query/kernel"].shape == (16, 16)


def test_query_init_folds_the_attention_scale():
  cfg = CFG.replace(emb_dim=64, head_dim=64, num_heads=4)
  params, _ = _init(cfg)
  att = params["decoder"]["layers_0"]["self_attention"]
  ratio = float(jnp.std(att["key"]["kernel"]) / jnp.std(att["query"]["kernel"]))
  assert ratio == pytest.approx(np.sqrt(64), rel=0.1)


def test_loss_composition():
  cfg = CFG.replace(z_loss=1e-2, aux_loss_factor=0.5, router_z_loss_factor=0.25)
  params, tokens = _init(cfg)
  targets = jnp.roll(tokens, -1, axis=1)
  weights = jnp.ones(tokens.shape).at[:, -2:].set(0)
  logits, metrics = _apply(cfg, params, tokens)
  loss, parts = compute_loss(cfg, logits, metrics, targets, weights)
  lg = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  ce = log_z - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights)
  want = ((ce + 1e-2 * log_z**2) * w).sum() / w.sum()
  want += 0.5 * np.mean(np.asarray(metrics.aux_loss)) + 0.25 * np.mean(np.asarray(metrics.router_z_loss))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(parts["cross_entropy"]) == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
  assert metrics.aux_loss.shape == (2,) and metrics.expert_load.shape == (2, 4)


def test_dense_model_has_no_moe_metrics():
  cfg = CFG.replace(num_sparse_layers=0, num_experts=0)
  params, tokens = _init(cfg)
  logits, metrics = _apply(cfg, params, tokens)
  assert metrics is None and logits.dtype == jnp.float32
  loss, _ = compute_loss(cfg, logits, None, tokens, jnp.ones(tokens.shape))
  assert np.isfinite(float(loss))


def test_bfloat16_activations_float32_params_and_logits():
  cfg = CFG.replace(activation_dtype="bfloat16")
  params, tokens = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = _apply(cfg, params, tokens)
  ref, _ = _apply(CFG, params, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15)


@pytest.mark.parametrize("change,field", [
    (dict(num_selected_experts=5), "num_selected_experts"),
    (dict(num_sparse_layers=3), "num_sparse_layers"),
    (dict(emb_dim=0), "emb_dim"),
    (dict(num_heads=-1), "num_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(dispatch="magic"), "dispatch"),
    (dict(train_capacity_factor=0.0), "train_capacity_factor"),
])
def test_invalid_config_names_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    CFG.replace(**change)


@pytest.mark.parametrize("policy", ["full", "dots", "attention"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  params, tokens = _init(CFG)
  def loss(p, cfg):
    logits, moe = _apply(cfg, p, tokens, deterministic=False)
    return compute_loss(cfg, logits, moe, tokens, jnp.ones(tokens.shape))[0]
  l0, g0 = jax.value_and_grad(loss)(params, CFG)
  l1, g1 = jax.value_and_grad(loss)(params, CFG.replace(remat_policy=policy))
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_attention_remat_with_dropout_gives_bitwise_the_same_loss_and_gradients():
  cfg = CFG.replace(dropout_rate=0.3, activation_dtype="bfloat16")
  params, tokens = _init(cfg)
  def loss(p, policy):
    logits, moe = Transformer(cfg.replace(remat_policy=policy)).apply(
        {"params": p}, tokens, deterministic=False, rngs={"dropout": jax.random.key(7)})
    return compute_loss(cfg, logits, moe, tokens, jnp.ones(tokens.shape))[0]
  step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (l0, g0), (l1, g1) = step(params, "none"), step(params, "attention")
  assert float(l0) == float(l1)
  jax.tree.map(np.testing.assert_array_equal, g0, g1)
  # the dropout is live: without it the loss differs
  l_det = jax.jit(lambda p: compute_loss(cfg, *_apply(cfg, p, tokens), tokens,
                                         jnp.ones(tokens.shape))[0])(params)
  assert float(l_det) != float(l0)


def test_attention_dropout_keep_mask_is_nn_dropouts_mask_broadcast_over_queries():
  import flax.linen as nn
  from openmoe_jax.model.layers import attend, dropout
  cfg = CFG.replace(dropout_rate=0.4)
  b, n, t = 2, 2, 6
  q, k, v = jax.random.normal(jax.random.key(0), (3, b, t, n, 4))
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None].repeat(b, 0)

  class Direct(nn.Module):  # the weights through nn.Dropout, as flaxformer applies it
    @nn.compact
    def __call__(self):
      logits = jnp.where(mask, jnp.einsum("bqnh,bknh->bnqk", q, k), -1e10)
      w = dropout(cfg, jax.nn.softmax(logits, axis=-1), False)
      return jnp.einsum("bnqk,bknh->bqnh", w, v), w

  class Keep(nn.Module):  # the keep mask drawn on its own, then attend
    @nn.compact
    def __call__(self):
      keep = dropout(cfg, jnp.ones((b, n, 1, t)), False) > 0
      return attend(q, k, v, mask, keep, cfg=cfg), keep

  rngs = {"dropout": jax.random.key(3)}
  want, w = Direct().apply({}, rngs=rngs)
  got, keep = Keep().apply({}, rngs=rngs)
  np.testing.assert_array_equal(got, want)
  dropped = np.asarray(w == 0) & np.asarray(mask)  # a dropped key column is dropped for every query
  assert 0 < (~np.asarray(keep)).sum() < keep.size
  np.testing.assert_array_equal(dropped, np.broadcast_to(~np.asarray(keep), w.shape) & np.asarray(mask))
