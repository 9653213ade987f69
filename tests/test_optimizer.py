"""Tests for openmoe_jax.optimizer: Adafactor vs a float64 numpy oracle, schedules, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openmoe_jax.training import optimizer as opt

# path -> (shape, batch dim or None, row dim or None, col dim or None), written out by hand from
# t5x's factor rules (`t5x/adafactor.py`, `t5x/contrib/moe/adafactor_utils.py`), independently
# of optimizer.factor_plan.
LAYOUT = {
    'token_embedder/embedding': ((256, 128), None, 1, 0),
    'decoder/layers_0/mlp/wi_0/kernel': ((128, 160), None, 0, 1),
    'decoder/layers_0/pre_mlp_layer_norm/scale': ((128,), None, None, None),
    'decoder/layers_1/mlp/router/router_weights/w/kernel': ((128, 4), None, None, None),
    'decoder/layers_1/mlp/expert/wi_0/kernel': ((4, 128, 136), 0, 1, 2),
    'decoder/layers_1/mlp/expert/wo/kernel': ((4, 136, 128), 0, 2, 1),
    'decoder/layers_3/mlp/expert/wi_1/kernel': ((4, 16, 24), 0, None, None),  # too small to factor
    'decoder/decoder_norm/scale': ((128,), None, None, None),
}

# The logical axes the model annotates these parameters with (t5x names).
AXES = {
    'token_embedder/embedding': ('vocab', 'embed'),
    'decoder/layers_0/mlp/wi_0/kernel': ('embed', 'mlp'),
    'decoder/layers_0/pre_mlp_layer_norm/scale': ('embed',),
    'decoder/layers_1/mlp/router/router_weights/w/kernel': ('embed', 'unmodeled'),
    'decoder/layers_1/mlp/expert/wi_0/kernel': ('expert', 'mlp_embed', 'expert_mlp'),
    'decoder/layers_1/mlp/expert/wo/kernel': ('expert', 'expert_mlp', 'mlp_embed'),
    'decoder/layers_3/mlp/expert/wi_1/kernel': ('expert', 'mlp_embed', 'expert_mlp'),
    'decoder/decoder_norm/scale': ('embed',),
}
AXES_FN = opt.axes_from_params(AXES)


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _flat(tree):
  return {opt.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _init_params(rng):
  params = {}
  for path, (shape, *_) in LAYOUT.items():
    params[path] = rng.normal(0.0, 0.05, shape)
  params['decoder/decoder_norm/scale'] *= 1e-4  # RMS below epsilon2: the floor applies
  return params


def _grads(rng, step):
  grads = {}
  for path, (shape, batch, *_) in LAYOUT.items():
    g = rng.normal(0.0, 1.0, shape) * rng.uniform(0.1, 3.0, shape)
    if batch is not None:  # per-expert gradient scales differ by 10^4
      g *= np.logspace(-2, 2, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    grads[path] = g * (1.0 + step)
  return grads


class NumpyAdafactor:
  """float64 reference: explicit loop over batch slices, v_hat = outer(R, C) / mean(R)."""

  def __init__(self, lr_fn, clip=1.0, beta1=None, wd=None, decay=0.8, eps1=1e-30, eps2=1e-3):
    self.lr_fn, self.clip, self.beta1, self.wd = lr_fn, clip, beta1, wd
    self.decay, self.eps1, self.eps2 = decay, eps1, eps2
    self.v, self.m, self.step, self.clipped = {}, {}, 0, 0

  def _slice(self, key, g, p, row, col, beta2):
    g2 = g * g + self.eps1
    if row is None:
      self.v[key] = beta2 * self.v.get(key, 0.0) + (1 - beta2) * g2
      y = g / np.sqrt(self.v[key])
    else:
      r_old, c_old = self.v.get(key, (0.0, 0.0))
      r = beta2 * r_old + (1 - beta2) * g2.mean(axis=col)
      c = beta2 * c_old + (1 - beta2) * g2.mean(axis=row)
      self.v[key] = (r, c)
      v_hat = (np.outer(r, c) if row == 0 else np.outer(c, r)) / r.mean()
      y = g / np.sqrt(v_hat)
    if self.clip is not None:
      denom = max(1.0, np.sqrt(np.mean(y * y)) / self.clip)
      self.clipped += denom > 1.0
      y = y / denom
    return self.lr_fn(self.step) * max(np.sqrt(np.mean(p * p)), self.eps2) * y

  def update(self, grads, params):
    beta2 = 1.0 - (self.step + 1.0) ** -self.decay
    updates = {}
    for path, (shape, batch, row, col) in LAYOUT.items():
      g, p = grads[path], params[path]
      if batch is None:
        u = self._slice(path, g, p, row, col, beta2)
      else:
        r, c = (None, None) if row is None else (row - 1, col - 1)
        u = np.stack([self._slice((path, e), g[e], p[e], r, c, beta2) for e in range(shape[0])])
      if self.beta1 is not None:
        u = self.beta1 * self.m.get(path, 0.0) + (1 - self.beta1) * u
        self.m[path] = u
      if self.wd:
        u = u + self.wd * p
      updates[path] = -u
    self.step += 1
    return updates


@pytest.mark.parametrize('clip,beta1,wd', [(1.0, None, None), (0.25, None, None),
                                           (None, 0.9, 1e-3)])
def test_adafactor_matches_float64_reference(clip, beta1, wd):
  rng = np.random.default_rng(0)
  lr_fn = lambda step: 0.5 / np.sqrt(max(step, 2))  # rsqrt with warmup 2: lr changes at step 3
  tx = opt.adafactor(opt.rsqrt_schedule(0.5, 2), clipping_threshold=clip, beta1=beta1,
                     weight_decay_rate=wd, logical_axes_fn=AXES_FN)
  ref = NumpyAdafactor(lr_fn, clip=clip, beta1=beta1, wd=wd)
  params_np = _init_params(rng)
  params = _nest({k: jnp.asarray(v, jnp.float32) for k, v in params_np.items()})
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(5):
    grads_np = _grads(rng, step)
    updates, state = update(_nest({k: jnp.asarray(v, jnp.float32) for k, v in grads_np.items()}),
                            state, params)
    expected = ref.update(grads_np, params_np)
    got = _flat(updates)
    for path in LAYOUT:
      # f32 vs f64: ~1e-6 relative error from rsqrt / means; the atol (1e-6 of the largest
      # entry) covers entries near zero after momentum / weight-decay cancellation.
      atol = 1e-6 * np.abs(expected[path]).max()
      np.testing.assert_allclose(got[path], expected[path], rtol=2e-5, atol=atol, err_msg=path)
    params = optax.apply_updates(params, updates)
    params_np = {k: params_np[k] + expected[k] for k in params_np}
  if clip == 0.25:
    assert ref.clipped > 10  # clipping was exercised, not only the identity branch
  assert int(state.count) == 5


def test_second_moment_decay_schedule():
  """v after two steps equals (1-b2_1) g1^2 + b2_1 g0^2 with b2_1 = 1 - 2^-0.8 (b2_0 = 0)."""
  tx = opt.adafactor(0.01)
  params = {'decoder': {'decoder_norm': {'scale': jnp.ones(8)}}}
  state = tx.init(params)
  g0, g1 = jnp.full(8, 2.0), jnp.full(8, 3.0)
  _, state = tx.update({'decoder': {'decoder_norm': {'scale': g0}}}, state, params)
  np.testing.assert_allclose(state.v['decoder']['decoder_norm']['scale'], 4.0, rtol=1e-6)
  _, state = tx.update({'decoder': {'decoder_norm': {'scale': g1}}}, state, params)
  b2 = 1.0 - 2.0 ** -0.8
  np.testing.assert_allclose(state.v['decoder']['decoder_norm']['scale'],
                             b2 * 4.0 + (1 - b2) * 9.0, rtol=1e-6)


def test_factor_plans_for_openmoe_paths():
  plan = lambda path, shape: opt.factor_plan(path, shape, logical_axes_fn=AXES_FN)
  for path, (shape, batch, row, col) in LAYOUT.items():
    p = plan(path, shape)
    assert p.rows == (() if row is None else (row,)), path
    assert p.cols == (() if col is None else (col,)), path
    assert p.batch == (() if batch is None else (batch,)), path
  # A parameter the table lacks is an error, not a silent guess.
  with pytest.raises(ValueError, match='carries no logical axes'):
    plan('decoder/layers_0/mlp/wi_0/bias', (128,))
  # Without axes (no annotations at all): optax's heuristic, two largest dims, the rest batch.
  assert opt.factor_plan('foo/bar', (3, 256, 512)) == opt.FactorPlan((1,), (2,), (0,))
  assert opt.factor_plan('foo/bar', (256, 64)) == opt.FactorPlan((), (), ())
  custom = opt.factor_plan('foo', (256, 256), logical_axes_fn=lambda p, n: ('mlp', 'embed'))
  assert custom == opt.FactorPlan((1,), (0,), ())
  with pytest.raises(ValueError, match='No Adafactor factor rule'):
    opt.factor_plan('foo', (256, 256), logical_axes_fn=lambda p, n: ('embd', 'mlp'))


def test_the_models_annotations_are_the_t5x_factor_layout():
  """The axes the optimizer factors by are the ones the model's parameters carry."""
  from openmoe_jax.training import steps
  from openmoe_jax.model.config import ModelConfig
  cfg = ModelConfig(vocab_size=256, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                    expert_mlp_dim=64, num_layers=2, num_experts=4, num_sparse_layers=1)
  axes = steps.param_axes(cfg)
  for path, want in AXES.items():
    path = path.replace('layers_3', 'layers_1')
    assert axes[path] == want, path
  assert axes['decoder/layers_1/self_attention/query/kernel'] == ('embed', 'joined_kv')
  assert axes['decoder/layers_0/self_attention/out/kernel'] == ('joined_kv', 'embed')
  assert axes['decoder/logits_dense/kernel'] == ('embed', 'vocab')
  assert axes['decoder/layers_1/pre_extra_mlp_layer_norm/scale'] == ('embed',)
  tx, _ = opt.make_optimizer(param_axes=axes)
  params = jax.eval_shape(lambda: jax.tree.map(jnp.zeros_like, _nest(
      {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in {
          'decoder/layers_1/mlp/expert/wi_0/kernel': (4, 256, 512)}.items()})))
  state = jax.eval_shape(tx.init, params)
  assert state.v_row['decoder']['layers_1']['mlp']['expert']['wi_0']['kernel'].shape == (4, 256)


def test_expert_kernel_state_shapes_and_per_expert_independence():
  params = {'mlp': {'expert': {'wi_0': {'kernel': jnp.ones((8, 256, 512)) * 0.02}}}}
  tx, _ = opt.make_optimizer()
  state = tx.init(params)
  k = lambda tree: tree['mlp']['expert']['wi_0']['kernel']
  assert k(state.v_row).shape == (8, 256) and k(state.v_col).shape == (8, 512)
  assert k(state.v).shape == (1,) and k(state.m).shape == (1,)
  g = jax.random.normal(jax.random.key(0), (8, 256, 512))
  u1, _ = tx.update({'mlp': {'expert': {'wi_0': {'kernel': g}}}}, state, params)
  u2, _ = tx.update({'mlp': {'expert': {'wi_0': {'kernel': g.at[0].mul(1e3)}}}}, state, params)
  # Factorisation, clipping and scaling are per expert: expert 0's gradient cannot move others.
  np.testing.assert_allclose(k(u1)[1:], k(u2)[1:], rtol=1e-6)


def test_rsqrt_and_constant_schedules():
  _, schedule = opt.make_optimizer()
  for step, lr in [(0, 0.01), (1, 0.01), (9999, 0.01), (10000, 0.01), (40000, 0.005)]:
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)
  _, const = opt.make_optimizer(learning_rate_schedule='constant')
  assert float(const(0)) == pytest.approx(0.01) and float(const(10**6)) == pytest.approx(0.01)


def test_adamw_cosine_schedule_shape():
  tx, schedule = opt.make_optimizer('adamw', base_learning_rate=1e-3, warmup_steps=100,
                                    decay_steps=1000, grad_clip_norm=1.0)
  lrs = np.array([float(schedule(s)) for s in range(0, 1001, 10)])
  assert lrs[0] == 0.0
  np.testing.assert_allclose(lrs[5], 5e-4, rtol=1e-5)  # linear warmup midpoint
  np.testing.assert_allclose(lrs[10], 1e-3, rtol=1e-6)  # peak
  assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)
  np.testing.assert_allclose(lrs[-1], 1e-4, rtol=1e-5)  # end = 10% of peak
  params = {'w': jnp.ones((4, 4)), 'scale': jnp.ones(4)}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  with pytest.raises(TypeError):
    opt.make_optimizer('adamw', decay_rate=0.8, decay_steps=10_000)


@pytest.mark.parametrize('name', ['adafactor', 'adamw'])
def test_quadratic_loss_decreases(name):
  target = jax.random.normal(jax.random.key(1), (128, 256))
  params = {'decoder': {'layers_0': {'mlp': {'wi_0': {'kernel': jnp.zeros((128, 256)) + 0.1}}}}}
  loss_fn = lambda p: jnp.mean((p['decoder']['layers_0']['mlp']['wi_0']['kernel'] - target) ** 2)
  tx, _ = opt.make_optimizer(name, 'constant', base_learning_rate=0.05)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(300):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_sharded_update_matches_unsharded():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'expert'))
  rng = np.random.default_rng(3)
  flat = {k: jnp.asarray(v, jnp.float32) for k, v in _init_params(rng).items()}
  params = _nest(flat)
  grads = _nest({k: jnp.asarray(v, jnp.float32) for k, v in _grads(rng, 0).items()})
  specs = jax.tree_util.tree_map_with_path(
      lambda p, x: P('expert') if 'expert/' in opt.path_str(p) else P('data') if x.shape[0] % 2 == 0
      else P(), params)
  tx, _ = opt.make_optimizer()
  state_specs = opt.state_partition_specs(jax.eval_shape(tx.init, params), params, specs)
  k = lambda tree: tree['decoder']['layers_1']['mlp']['expert']['wo']['kernel']
  assert k(state_specs.v_row) == P('expert', None) and k(state_specs.v_col) == P('expert', None)
  assert k(state_specs.v) == P() and state_specs.count == P()
  to_sharding = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,
                                          is_leaf=lambda s: isinstance(s, P))
  p_sh, s_sh = to_sharding(specs), to_sharding(state_specs)
  sharded_params = jax.device_put(params, p_sh)
  state = jax.jit(tx.init, out_shardings=s_sh)(sharded_params)
  update = jax.jit(tx.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  updates, state = update(jax.device_put(grads, p_sh), state, sharded_params)
  ref_updates, ref_state = tx.update(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((ref_updates, ref_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-12)
  assert k(state.v_row).sharding.spec == P('expert', None)


def test_state_specs_replicate_placeholders_of_unfactored_params():
  from jax.sharding import PartitionSpec as P
  params = {'decoder': {'layers_0': {'mlp': {'wi_0': {'kernel': jnp.zeros((64, 256))}}}}}
  tx = opt.adafactor(0.01)  # 64 < 128: not factored, v_row / v_col are f32[1]
  state = tx.init(params)
  specs = opt.state_partition_specs(
      state, params, {'decoder': {'layers_0': {'mlp': {'wi_0': {'kernel': P(None, 'model')}}}}})
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P))):
    if leaf.shape == (1,):
      assert spec == P()
