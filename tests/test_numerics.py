"""OpenMoE's bfloat16 numerics (flaxformer casts) and token padding, against the float64 reference.

`reference.forward(bf16_casts=True)` rounds to bfloat16 wherever flaxformer's OpenMoE casts to its
activation dtype (XueFuzhao/flaxformer `components/layer_norm.py`, `components/attention/
dense_attention.py`, `architectures/moe/moe_layers.py`; OpenMoE, arXiv:2402.01739). Each test also
checks that the reference with one cast moved elsewhere is farther from the model than the
tolerance, so the test can see that cast. B * L = 14 tokens is not a multiple of E = 4: the MoE
layers pad 2 tokens (one column, flaxformer `_maybe_pad`) and route 4 groups of 4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.interop.hf import name_map
from openmoe_jax.model.transformer import Transformer
from openmoe_jax.model.partitioning import unbox
import reference

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=48,
                  expert_mlp_dim=32, num_layers=4, num_experts=4, num_sparse_layers=2,
                  group_size=8, activation_dtype="bfloat16", min_expert_capacity=1,
                  eval_capacity_factor=1.0)
B, L = 2, 7
# Relative RMS error of the logits. bfloat16 has 8 significant bits (2^-8 = 3.9e-3); with the
# same casts at the same places the model stays within 2.5e-3 (measured 1.4e-3 to 1.7e-3; the
# rest is accumulation order and 1-ulp flips), moving one cast costs 3.3e-3 to 5e-3.
BF16_TOL = 2.5e-3


def _rel_rms(a, b):
  return float(np.sqrt(np.mean((a - b) ** 2)) / np.std(b))


@pytest.fixture(scope="module")
def setup():
  tokens = jax.random.randint(jax.random.key(0), (B, L), 1, CFG.vocab_size)
  params = unbox(Transformer(CFG).init(jax.random.key(1), tokens))["params"]

  def vary(path, x):  # norm scales away from 1, so the norm's cast order matters
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return 1.0 + 0.3 * jax.random.normal(jax.random.key(len(name) * 7 + x.size), x.shape)
    return x
  params = jax.tree_util.tree_map_with_path(vary, params)
  rows, cols = routing.token_padding(B, L, CFG.num_experts)
  assert (rows, cols) == (0, 1)
  n = (B + rows) * (L + cols)
  group = n // routing.num_groups(n, CFG.group_size, CFG.num_experts)
  cap = routing.expert_capacity(group, CFG.num_experts, 1.0, min_capacity=1)
  np_params = jax.tree.map(np.asarray, params)

  def ref(**kw):
    kw.setdefault("pad_multiple", CFG.num_experts)
    kw.setdefault("group_tokens", group)
    return reference.forward(np_params, CFG, np.asarray(tokens), capacity=cap, **kw)
  return params, tokens, ref


def _model_logits(cfg, params, tokens):
  logits, metrics = Transformer(cfg).apply({"params": params}, tokens)
  return np.asarray(logits, np.float64), metrics


def test_bfloat16_forward_has_openmoe_casts(setup):
  params, tokens, ref = setup
  ours, metrics = _model_logits(CFG, params, tokens)
  assert float(np.max(np.asarray(metrics.dropped_fraction))) > 0, "capacity should bind"
  want = ref(bf16_casts=True)
  assert _rel_rms(ours, want) < BF16_TOL
  # Each of these is what the model computed before (or computes with the knob set).
  for moved in (dict(moe_float32_output=False), dict(float32_norm=True)):
    assert _rel_rms(ours, ref(bf16_casts=True, **moved)) > BF16_TOL, moved
  # Routing all 14 tokens as one group (the exported model's old fallback) is another model.
  assert _rel_rms(ours, ref(bf16_casts=True, pad_multiple=None, group_tokens=B * L)) > BF16_TOL


@pytest.mark.parametrize("knob", ["moe_float32_output", "float32_norm"])
def test_bfloat16_knobs_keep_their_documented_casts(setup, knob):
  params, tokens, ref = setup
  value = not getattr(CFG, knob)
  ours, _ = _model_logits(CFG.replace(**{knob: value}), params, tokens)
  assert _rel_rms(ours, ref(bf16_casts=True, **{knob: value})) < BF16_TOL


def test_attention_logits_and_softmax_in_bfloat16():
  """One attention sublayer with large logits: bfloat16 logits and softmax (flaxformer
  float32_logits=False) or, with the knob, float32."""
  from openmoe_jax.model.layers import Attention, attention_mask
  cfg = CFG
  x = jax.random.normal(jax.random.key(3), (1, 16, cfg.emb_dim)).astype(jnp.bfloat16)
  pos = jnp.arange(16)[None]
  mask = attention_mask(jnp.ones((1, 16), jnp.int32), jnp.ones((1, 16), bool))
  variables = Attention(cfg).init(jax.random.key(4), x, pos, mask, deterministic=True)
  sa = unbox(variables)["params"]
  sa = jax.tree.map(lambda k: k * 4, sa)  # logits of a few units: bfloat16 rounding shows
  lp = {"self_attention": reference.jax_free(sa)}
  x64 = np.asarray(x, np.float64)
  ones = np.ones((1, 16), int)

  def ref(f32):
    return reference._attention(x64, lp, cfg, np.asarray(pos), ones, ones > 0, reference.bf16,
                                reference._exact if f32 else reference.bf16)
  errs = {}
  for f32 in (False, True):
    got = np.asarray(Attention(cfg.replace(float32_attention_logits=f32)).apply(
        {"params": sa}, x, pos, mask, deterministic=True), np.float64)
    errs[f32] = (_rel_rms(got, ref(f32)), _rel_rms(got, ref(not f32)))
  for f32, (same, other) in errs.items():
    assert same < 0.5 * other, (f32, errs)


def test_float32_forward_pads_like_flaxformer(setup):
  """float32: the padded grouping equals the reference's to float32 precision."""
  params, tokens, ref = setup
  cfg = CFG.replace(activation_dtype="float32")
  ours, _ = _model_logits(cfg, params, tokens)
  np.testing.assert_allclose(ours, ref(), atol=2e-4, rtol=2e-4)


def _torch_model(cfg, params, dtype):
  import torch
  from openmoe_jax.interop.hf.modeling_openmoe import OpenMoeConfig, OpenMoeForCausalLM
  model = OpenMoeForCausalLM(OpenMoeConfig(**name_map.hf_config(cfg))).eval()
  state = {}
  for e in name_map.entries(cfg.num_layers, cfg.is_moe_layer):
    value = np.asarray(_get(params, e.flax_path), np.float32)
    state[e.hf_key] = torch.from_numpy(np.array(value.T if e.transpose else value))
  model.load_state_dict(state)
  return model.to(dtype)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_pytorch_model_pads_and_casts_like_flaxformer(setup, dtype):
  """The exported PyTorch model on 2 x 7 tokens (not a multiple of E): flaxformer's padding and
  grouping, and in bfloat16 its casts."""
  torch = pytest.importorskip("torch")
  params, tokens, ref = setup
  model = _torch_model(CFG, params, getattr(torch, dtype))
  with torch.no_grad():
    got = model(torch.from_numpy(np.asarray(tokens)).long(), use_cache=False).logits
  got = got.double().numpy()
  if dtype == "float32":  # torch float32 CPU kernels: 1e-3 (the one-group routing: 6e-3)
    np.testing.assert_allclose(got, ref(), atol=1e-3, rtol=1e-3)
    assert np.abs(got - ref(pad_multiple=None, group_tokens=B * L)).max() > 4e-3
    return
  assert _rel_rms(got, ref(bf16_casts=True)) < BF16_TOL
  assert _rel_rms(got, ref(bf16_casts=True, moe_float32_output=False)) > BF16_TOL


def test_dropout_is_broadcast_over_length_as_flaxformer():
  """flaxformer's DROPOUT_FACTORY (broadcast_dims=(-2,)): one mask per row and feature, the same
  at every position; attention probabilities share one mask over the queries."""
  from openmoe_jax.model.layers import dropout
  cfg = CFG.replace(dropout_rate=0.5)
  x = jnp.ones((3, 9, 16))
  y = nn_apply(lambda v: dropout(cfg, v, False), x)
  assert np.all(y == y[:, :1]) and 0 < np.mean(y == 0) < 1
  w = jnp.ones((2, 2, 9, 9))  # [B, N, Q, K]
  y = nn_apply(lambda v: dropout(cfg, v, False), w)
  assert np.all(y == y[:, :, :1]) and not np.all(y == y[..., :1])
  # The whole model in training mode: dropout active, and deterministic without it.
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 1, cfg.vocab_size)
  model = Transformer(cfg)
  params = model.init(jax.random.key(1), tokens)["params"]
  train = lambda seed: model.apply({"params": params}, tokens, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})[0]
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))


def nn_apply(fn, x):
  import flax.linen as nn

  class _M(nn.Module):
    @nn.compact
    def __call__(self, v):
      return fn(v)
  return np.asarray(_M().apply({}, x, rngs={"dropout": jax.random.key(0)}))
