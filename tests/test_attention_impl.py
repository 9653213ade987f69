"""ATTENTION_IMPL: every attention core against a float64 numpy reference and the dense path,
forward and backward, with packing, padding, dropout, GQA and MLA's head widths; through the
model (explicit positions, segment ids, cached decoding, a sharded step); splash in Pallas
interpret mode on CPU and compiled for a TPU topology by libtpu; 'auto'; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from openmoe_jax.errors import UsageError
from openmoe_jax.evaluation import decoding
from openmoe_jax.model import attention as A
from openmoe_jax.model import partitioning as part
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer, compute_loss
from openmoe_jax.planning import target
from openmoe_jax.planning import tpu
from openmoe_jax.training import run_setup

needs_libtpu = pytest.mark.skipif(not tpu.libtpu_installed(),
                                  reason="needs libtpu (pip install 'openmoe_jax[tpu]')")


def _reference(q, k, v, visible, w, scale, do):
  """float64 numpy: out = (softmax(q k^T * scale, masked) * w) v and its gradients for dO.

  Masked logits take -1e10 (so a row that sees nothing averages all keys, as the dense path);
  w [B, N, S]: dropout's keep / keep_prob (1 without dropout). Heads of K < N repeated."""
  q, k, v, w, do = (np.asarray(x, np.float64) for x in (q, k, v, w, do))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bqnh,bknh->bnqk", q, k) * scale
  m = visible[:, None]
  s = np.where(m, s, -1e10)
  pr = np.exp(s - s.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  wp = pr * w[:, :, None, :]
  out = np.einsum("bnqk,bknh->bqnh", wp, v)
  dv = np.einsum("bnqk,bqnh->bknh", wp, do)
  dp = np.einsum("bqnh,bknh->bnqk", do, v) * w[:, :, None, :]
  ds = pr * (dp - np.sum(dp * pr, -1, keepdims=True)) * m * scale
  dq = np.einsum("bnqk,bknh->bqnh", ds, k)
  dk = np.einsum("bnqk,bqnh->bknh", ds, q)
  fold = lambda x: x.reshape(*x.shape[:2], -1, g, x.shape[-1]).sum(3)  # back to K heads
  return out, (dq, fold(dk), fold(dv))


B, T = 2, 128


def _inputs(n, kv_heads, h, hv, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, T, n, h))
  k = r.normal(size=(B, T, kv_heads, h))
  v = r.normal(size=(B, T, kv_heads, hv))
  seg = np.ones((B, T), np.int32)
  seg[0, 50:] = 2                          # two packed sequences
  seg[1, 90:] = 0                          # padding at the end of row 1
  real = seg > 0
  real[0, 7] = False                       # a non-real token inside a sequence
  mask = A.AttentionMask.for_training(jnp.asarray(seg), jnp.asarray(real))
  do = r.normal(size=(B, T, n, hv))
  return [jnp.asarray(x, dtype) for x in (q, k, v)], mask, np.asarray(mask.dense()[:, 0]), do


# (heads, kv heads, head dim, value head dim): multi-head, grouped-query, MLA's widths.
SHAPES = [(4, 4, 16, 16), (4, 2, 16, 16), (4, 4, 24, 16)]


def _run(impl, cfg, qkv, mask, keep, do):
  def f(q, k, v):
    if impl == "cudnn-xla":  # the cuDNN path's argument mapping, run by XLA on CPU
      return A.cudnn(q, k, v, mask, scale=cfg.attention_scale, dtype=cfg.dtype,
                     implementation="xla")
    return A.attend(q, k, v, mask, keep, cfg=cfg.replace(attention_impl=impl))
  out, vjp = jax.vjp(f, *qkv)
  return np.asarray(out, np.float64), [np.asarray(g, np.float64)
                                       for g in vjp(jnp.asarray(do, out.dtype))]


@pytest.mark.parametrize("impl", ["dense", "chunked", "splash", "cudnn-xla"])
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "mla_dims"])
def test_every_core_matches_a_float64_reference_forward_and_backward(impl, shape):
  n, kv, h, hv = shape
  cfg = ModelConfig(activation_dtype="float32", num_heads=n, head_dim=h, attention_scale=0.25,
                    attention_block=32)
  qkv, mask, visible, do = _inputs(n, kv, h, hv)
  out, grads = _run(impl, cfg, qkv, mask, None, do)
  want, want_grads = _reference(*qkv, visible, np.ones((B, n, T)), 0.25, do)
  # Rows that see no key: 'dense' and 'chunked' average all keys as the reference does; the
  # kernels give them their own value (they carry no loss), so those rows are left out.
  rows = visible.any(-1)
  if impl in ("splash", "cudnn-xla"):
    out, want = out[rows], want[rows]
    do_rows = np.where(rows[:, :, None, None], do, 0.0)
    out2, grads = _run(impl, cfg, qkv, mask, None, do_rows)
    want_grads = _reference(*qkv, visible, np.ones((B, n, T)), 0.25, do_rows)[1]
  assert not rows.all()
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=["gqa", "mla_dims"])
def test_chunked_dropout_equals_dense_and_the_reference(shape):
  n, kv, h, hv = shape
  cfg = ModelConfig(activation_dtype="float32", num_heads=n, head_dim=h, dropout_rate=0.25,
                    attention_block=48)  # 48: blocks that do not divide T (padded)
  qkv, mask, visible, do = _inputs(n, kv, h, hv, seed=1)
  keep = jax.random.bernoulli(jax.random.key(3), 0.75, (B, n, 1, T))
  want, want_grads = _reference(*qkv, visible, np.asarray(keep[:, :, 0], np.float64) / 0.75,
                                1.0, do)
  for impl in ("dense", "chunked"):
    out, grads = _run(impl, cfg, qkv, mask, keep, do)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads):
      np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("impl, atol", [("dense", 6e-2), ("chunked", 2e-2), ("splash", 2e-2)])
def test_bfloat16_within_its_rounding_of_the_reference(impl, atol):
  """bfloat16 inputs: 'dense' computes logits and softmax in bfloat16 (flaxformer's casts);
  'chunked' and 'splash' in float32, so they sit closer to the float64 reference."""
  n, kv, h, hv = SHAPES[1]
  cfg = ModelConfig(activation_dtype="bfloat16", num_heads=n, head_dim=h, attention_scale=0.25,
                    attention_block=32)
  qkv, mask, visible, do = _inputs(n, kv, h, hv, seed=2, dtype=jnp.bfloat16)
  rows = visible.any(-1)
  do = np.where(rows[:, :, None, None], do, 0.0)
  out, grads = _run(impl, cfg, qkv, mask, None, do)
  want, want_grads = _reference(*qkv, visible, np.ones((B, n, T)), 0.25, do)
  np.testing.assert_allclose(out[rows], want[rows], atol=atol)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=atol * 4, rtol=5e-2)


# --------------------------------------------------------------------------- through the model

CFG = ModelConfig(vocab_size=128, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_dim=64, expert_mlp_dim=64, num_layers=2, num_experts=4,
                  num_sparse_layers=1, group_size=64, activation_dtype="float32",
                  attention_scale=0.25, attention_block=32, capacity_mode="dropless")
MLA = CFG.replace(num_kv_heads=0, head_dim=24, kv_lora_rank=16, q_lora_rank=12,
                  qk_rope_head_dim=8, v_head_dim=16)


def _batch(length=T, rows=B):
  r = np.random.default_rng(5)
  tokens = r.integers(1, 128, (rows, length)).astype(np.int32)
  seg = np.ones((rows, length), np.int32)
  seg[0, length // 3:] = 2
  seg[1, length - 20:] = 0
  tokens[1, length - 20:] = 0
  pos = np.concatenate([np.arange(length // 3), np.arange(length - length // 3)])
  positions = np.stack([pos] + [np.arange(length)] * (rows - 1)).astype(np.int32)
  return [jnp.asarray(x) for x in (tokens, seg, positions)]


def _loss_and_grads(cfg, params, batch, rngs=None):
  tokens, seg, pos = batch

  def loss(p):
    logits, moe = Transformer(cfg).apply({"params": p}, tokens, tokens, seg, pos,
                                         deterministic=rngs is None, rngs=rngs)
    return compute_loss(cfg, logits, moe, tokens, (tokens > 0).astype(jnp.float32))[0], logits
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, logits, grads


@pytest.mark.parametrize("cfg", [CFG, MLA, CFG.replace(dropout_rate=0.1)],
                         ids=["gqa", "mla", "dropout"])
def test_chunked_model_equals_dense_with_packing_positions_and_dropout(cfg):
  batch = _batch()
  params = part.unbox(Transformer(cfg).init(jax.random.key(0), batch[0])["params"])
  rngs = {"dropout": jax.random.key(7)} if cfg.dropout_rate else None
  dense = _loss_and_grads(cfg, params, batch, rngs)
  chunked = _loss_and_grads(cfg.replace(attention_impl="chunked"), params, batch, rngs)
  np.testing.assert_allclose(chunked[0], dense[0], rtol=1e-6)
  np.testing.assert_allclose(chunked[1], dense[1], atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               chunked[2], dense[2])


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("cfg", [CFG, MLA], ids=["gqa", "mla"])
def test_cached_decoding_equals_dense(cfg, impl):
  """The cache's queries sit at columns index..+T: 'chunked' takes the spec's columns, and
  splash's decoding steps take 'chunked' (module docstring)."""
  params = part.unbox(Transformer(cfg).init(jax.random.key(1), jnp.ones((1, 16), jnp.int32))
                      ["params"])
  prompts = [[5, 6, 7], [9], list(range(11, 41))]
  want = decoding.generate(params, cfg, prompts, max_new_tokens=6, eos_id=-1)
  got = decoding.generate(params, cfg.replace(attention_impl=impl), prompts, max_new_tokens=6,
                          eos_id=-1)
  assert [g.ids for g in got] == [g.ids for g in want]
  np.testing.assert_allclose([g.log_probs for g in got], [g.log_probs for g in want], atol=1e-5)


@pytest.mark.slow
def test_splash_step_under_a_mesh_equals_the_single_device_dense_step():
  """Splash under shard_map over batch and heads (mesh data 4 x model 2), in
  interpret mode: loss, logits and gradients as the unsharded dense model's."""
  cfg = CFG.replace(num_kv_heads=0, num_heads=2, capacity_mode="fixed", no_drop=True)
  batch = _batch(rows=4)
  params = part.unbox(Transformer(cfg).init(jax.random.key(0), batch[0])["params"])
  want = _loss_and_grads(cfg, params, batch)
  mesh = part.make_mesh(1, 2)   # data 4 x model 2
  splash = cfg.replace(attention_impl="splash")
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.LOGICAL_AXIS_RULES):
    got = jax.jit(lambda p, b: _loss_and_grads(splash, p, b))(params, batch)
  tokens = np.asarray(batch[0])
  real = (tokens > 0)[..., None]
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(np.where(real, got[1], 0), np.where(real, want[1], 0), atol=5e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-3),
               got[2], want[2])


# --------------------------------------------------------------------------- choice and refusals


def test_auto_picks_by_backend_and_shape():
  cfg = CFG.replace(attention_impl="auto")
  pick = lambda c, platform, **kw: A.resolve(c, batch=8, q_len=kw.get("t", 2048),
                                             kv_len=kw.get("t", 2048), platform=platform,
                                             decoding=kw.get("decoding", False))
  assert pick(cfg, "cpu") == "dense"
  assert pick(cfg, "cpu", t=32768) == "chunked"        # 8 x 4 x 32k^2 x 4 bytes > 1 GiB
  assert pick(cfg, "tpu") == "splash"
  assert pick(cfg, "tpu", t=1000) == "dense"           # not a multiple of 128
  assert pick(cfg.replace(dropout_rate=0.1), "tpu") == "dense"   # splash has no dropout
  assert pick(cfg, "tpu", decoding=True) == "dense"
  assert pick(cfg, "gpu") == "cudnn"
  assert pick(cfg.replace(dropout_rate=0.1), "gpu", t=32768) == "chunked"
  # Explicit kernels: decoding and shapes splash cannot take go 'chunked'.
  splash = CFG.replace(attention_impl="splash")
  assert pick(splash, "tpu", decoding=True) == "chunked"
  assert pick(splash, "tpu", t=16) == "chunked"
  with target.compiling_for("tpu"):
    assert A.resolve(cfg, batch=8, q_len=256, kv_len=256) == "splash"


@pytest.mark.parametrize("impl, seq_len, message", [
    ("splash", 100, "ATTENTION_IMPL='splash' needs a sequence length that is a multiple of 128, "
                    "got 100"),
    ("cudnn", 128, "ATTENTION_IMPL='cudnn' runs on GPUs only; this is cpu"),
])
def test_bad_attention_settings_are_one_line_before_anything_runs(impl, seq_len, message):
  with pytest.raises(UsageError) as e:
    run_setup.build(CFG.replace(attention_impl=impl), batch_size=8, seq_len=seq_len)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernels_without_dropout_refuse_a_dropout_rate(impl):
  with pytest.raises(ValueError, match=f"attention_impl='{impl}' has no attention dropout"):
    CFG.replace(attention_impl=impl, dropout_rate=0.1)
  with pytest.raises(ValueError, match="attention_block must be a positive multiple of 8"):
    CFG.replace(attention_block=100)


def test_cudnn_core_refuses_a_cpu_backend():
  qkv, mask, _, _ = _inputs(4, 4, 16, 16)
  with pytest.raises(ValueError, match="runs on GPUs only"):
    A.cudnn(*qkv, mask, scale=1.0, dtype=jnp.float32)


# --------------------------------------------------------------------------- TPU, by XLA:TPU


@needs_libtpu
def test_splash_and_auto_compile_for_tpu_and_drop_the_t_by_t_temporaries():
  """The tiny model at 2048 tokens on v4:2x2x1 (expert 4 x model 2): splash (and 'auto', which
  picks it on TPU) is a Pallas custom call, and the step's temporaries lose about the dense
  probabilities of every layer; 'chunked' also keeps them linear in the length."""
  from openmoe_jax import gin_utils
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train`
  from openmoe_jax.planning import plan as tpu_plan
  gin_utils.parse_gin(["models/tiny.gin"], ["ACTIVATION_DTYPE='bfloat16'"], finalize=False)
  cfg = gin_utils.model_config().replace(head_dim=128)
  seq, batch = 2048, 16
  plans = {impl: tpu_plan.plan(cfg.replace(attention_impl=impl), "v4:2x2x1",
                               num_expert_partitions=4, num_model_partitions=2,
                               batch_size=batch, seq_len=seq, with_hlo=True)
           for impl in ("dense", "splash", "auto")}
  for impl, plan in plans.items():
    assert plan.get("compile_error") is None and plan["fits"], (impl, plan.get("compile_error"))
    assert ("tpu_custom_call" in plan["hlo"]) == (impl != "dense"), impl
  assert plans["auto"]["attention_impl"] == "splash"
  # Per device: batch / 4 rows, heads / 2, [T, T] bf16 probabilities in each of the 2 layers.
  probs = batch // 4 * (cfg.num_heads // 2) * seq * seq * 2 * cfg.num_layers
  saved = plans["dense"]["temp_bytes_per_device"] - plans["splash"]["temp_bytes_per_device"]
  assert saved >= 0.5 * probs, (saved, probs)
  # XLA counts nothing inside the kernels: the plan adds their FLOPs (causal blocks, the flash
  # backward's recomputation) at the peak. They stand in for about the attention FLOPs XLA
  # counted in the dense step (full T x T, forward and backward: 6 matmul passes vs 9 x 5/8).
  sp = plans["splash"]
  assert sp["splash_flops_per_device"] == pytest.approx(
      A.splash_train_flops(cfg, batch, seq) / 8)
  seen = plans["dense"]["xla_flops_per_device"] - sp["xla_flops_per_device"]
  assert 0.7 * seen < sp["splash_flops_per_device"] < 1.2 * seen, (sp["splash_flops_per_device"],
                                                                   seen)
  assert sp["estimated_step_seconds"] >= sp["splash_flops_per_device"] / sp[
      "peak_bf16_flops_per_device"]
  assert "splash attention kernels' FLOPs at the bf16 peak" in sp["estimate_method"]
  assert plans["dense"]["splash_flops_per_device"] == 0
  # MFU counts attention over all keys (PaLM's count); the causal MFU halves that part.
  from openmoe_jax.model import counts
  c = counts.summarize(cfg, seq)
  share = c["attention_flops_per_token"] / c["train_flops_per_token"]
  assert 0 < share < 1
  assert sp["estimated_mfu_causal"] == pytest.approx(sp["estimated_mfu"] * (1 - share / 2))


@needs_libtpu
def test_splash_is_refused_on_v3_and_auto_leaves_it_out_there():
  """Mosaic has no bfloat16 matmul on v2/v3 (splash fails to compile on v3-256 for the 8B
  step): an explicit 'splash' plan is one line, and 'auto' takes 'dense' there."""
  from openmoe_jax.planning import plan as tpu_plan
  cfg = CFG.replace(capacity_mode="fixed", attention_impl="splash")
  with pytest.raises(UsageError) as e:
    tpu_plan.plan(cfg, "v3:2x2", num_expert_partitions=4, num_model_partitions=1, batch_size=8,
                  seq_len=128)
  assert "needs TPU v4 or later: Mosaic has no bfloat16 matmul on v3" in str(e.value)
  assert "\n" not in str(e.value)
  with target.compiling_for("tpu", "v3"):
    assert A.resolve(cfg.replace(attention_impl="auto"), batch=8, q_len=256,
                     kv_len=256) == "dense"
  with target.compiling_for("tpu", "v5p"):
    assert A.resolve(cfg.replace(attention_impl="auto"), batch=8, q_len=256,
                     kv_len=256) == "splash"
