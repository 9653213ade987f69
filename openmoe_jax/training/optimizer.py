"""OpenMoE's optimizers as optax transformations: factored Adafactor (default) and AdamW.

Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) with the t5x settings OpenMoE trained with
(XueFuzhao/t5x `t5x/adafactor.py` defaults, XueFuzhao/flaxformer `tokens_choose_decoder_only_*.gin`): second-moment decay beta2_t = 1 - (t + 1)^-0.8, no momentum, update clipping at
RMS 1.0, updates scaled by max(RMS(param), 1e-3), no weight decay, and second moments factored
by logical-axis rules, with expert kernels factored per expert. LR: 1 / sqrt(max(step, 10^4)).

Shapes: E experts, D embed, F (expert) mlp hidden, V vocab; R / C the factored row / column dims.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

ROW, COLUMN, BATCH, NONE = 'row', 'column', 'batch', 'none'

# t5x `standard_factor_rules()` plus the MoE rules of `t5x/contrib/moe/adafactor_utils.py`.
FACTOR_RULES: Mapping[str, str] = {
    'vocab': COLUMN, 'embed': ROW, 'mlp': COLUMN, 'mlp_activations': COLUMN, 'heads': COLUMN,
    'kv': COLUMN, 'joined_kv': COLUMN, 'relpos_buckets': NONE, 'layers': BATCH, 'stack': BATCH,
    'expert': BATCH, 'expert_mlp': COLUMN, 'mlp_embed': ROW, 'unmodeled': NONE,
    'lora': COLUMN, 'lora_in': ROW}

LogicalAxesFn = Callable[[str, int], Optional[Sequence[Optional[str]]]]
ScalarOrSchedule = Union[float, optax.Schedule]


def path_str(path) -> str:
  """'/'-joined parameter path from a jax key path (or a string, returned as is)."""
  if isinstance(path, str):
    return path
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def axes_from_params(param_axes: Mapping[str, Sequence[Optional[str]]]) -> LogicalAxesFn:
  """A `logical_axes_fn` reading the logical axes the parameters carry.

  Args:
    param_axes: '/'-joined parameter path (as in the params tree, e.g.
      'decoder/layers_1/mlp/expert/wi_0/kernel') -> its logical axis names, as the model's
      `nn.with_logical_partitioning` annotations give them (`steps.param_axes(cfg)`).

  Returns:
    (path, ndim) -> axes; a path the table lacks is an error, never a silent guess.
  """
  def fn(path: str, ndim: int):
    key = path[len('params/'):] if path.startswith('params/') else path
    if key not in param_axes:
      raise ValueError(f'Parameter {key} carries no logical axes (every parameter must be '
                       'created with partitioning.param_init).')
    return tuple(param_axes[key])
  return fn


@dataclasses.dataclass(frozen=True)
class FactorPlan:
  """Dims of one parameter: `rows`/`cols` (empty if not factored) and `batch`, which are never
  averaged over: factoring, parameter scale and clipping are per slice (per expert), as in t5x."""
  rows: tuple[int, ...]
  cols: tuple[int, ...]
  batch: tuple[int, ...]

  @property
  def factored(self) -> bool:
    return bool(self.rows and self.cols)

  def averaging_dims(self, ndim: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d not in self.batch)


def _heuristic_plan(shape, min_dim_size_to_factor: int, factored: bool) -> FactorPlan:
  # optax / t5x heuristic: factor the two largest dims; other dims are per-slice (batch).
  order = np.argsort(shape, kind='stable')
  if not factored or len(shape) < 2 or shape[order[-2]] < min_dim_size_to_factor:
    return FactorPlan((), (), ())
  row, col = int(order[-2]), int(order[-1])
  return FactorPlan((row,), (col,), tuple(d for d in range(len(shape)) if d not in (row, col)))


def factor_plan(path, shape: Sequence[int], *,
                logical_axes_fn: Optional[LogicalAxesFn] = None,
                factor_rules: Mapping[str, str] = FACTOR_RULES,
                min_dim_size_to_factor: int = 128, factored: bool = True) -> FactorPlan:
  """Factoring decision for one parameter from its logical axes.

  A parameter is factored when it has ROW and COLUMN dims whose sizes (products, if several) are
  both >= `min_dim_size_to_factor`; BATCH dims are kept; otherwise its second moment is full.
  Unlike t5x, the size threshold also applies to batched (expert) kernels, so tiny test models
  keep exact second moments; at OpenMoE sizes (D, F >= 768) both agree.

  Args:
    path: parameter path, e.g. 'decoder/layers_1/mlp/expert/wi_0/kernel'.
    shape: parameter shape.
    logical_axes_fn: (path, ndim) -> logical axis names (`axes_from_params`), or None for
      optax's heuristic (the two largest dims are ROW / COLUMN if the smaller is >=
      min_dim_size_to_factor; others BATCH), for parameters without annotations.
    factor_rules: logical name -> ROW / COLUMN / BATCH / NONE.
    min_dim_size_to_factor: smallest row / column size that is factored.
    factored: False disables factoring everywhere (batch dims are still honoured).
  """
  axes = logical_axes_fn(path_str(path), len(shape)) if logical_axes_fn else None
  if axes is None:
    return _heuristic_plan(shape, min_dim_size_to_factor, factored)
  if len(axes) != len(shape):
    raise ValueError(f'Logical axes {axes} do not match shape {shape} of {path_str(path)}.')
  unknown = [a for a in axes if a is not None and a not in factor_rules]
  if unknown:
    raise ValueError(f'No Adafactor factor rule for axes {unknown} of {path_str(path)}.')
  kinds = [NONE if a is None else factor_rules[a] for a in axes]
  rows = tuple(d for d, k in enumerate(kinds) if k == ROW)
  cols = tuple(d for d, k in enumerate(kinds) if k == COLUMN)
  batch = tuple(d for d, k in enumerate(kinds) if k == BATCH)
  if rows and cols and NONE in kinds:
    raise ValueError(f'Incomplete factor rule {kinds} for {path_str(path)}.')
  big = (math.prod(shape[d] for d in rows) >= min_dim_size_to_factor and
         math.prod(shape[d] for d in cols) >= min_dim_size_to_factor)
  if not (factored and rows and cols and big):
    rows, cols = (), ()
  return FactorPlan(rows, cols, batch)


class AdafactorState(NamedTuple):
  """Adafactor state; all fields but `count` mirror the params. Factored [E, D, F] kernel: v_row
  f32[E, D], v_col f32[E, F], v f32[1]; unfactored: v f32[same shape], v_row = v_col = f32[1];
  `m` is f32[1] without momentum."""
  count: jax.Array  # int32[], number of updates applied so far.
  v_row: Any
  v_col: Any
  v: Any
  m: Any


def _leaf_init(p, plan: FactorPlan, beta1, momentum_dtype):
  one = jnp.zeros((1,), jnp.float32)  # placeholder, as in t5x, keeps every field a full tree
  zeros = lambda shape: jnp.zeros(shape, jnp.float32)
  if plan.factored:
    v_row, v_col = zeros(np.delete(p.shape, plan.cols)), zeros(np.delete(p.shape, plan.rows))
    v = one
  else:
    v_row, v_col, v = one, one, zeros(p.shape)
  m = one if beta1 is None else jnp.zeros(p.shape, momentum_dtype)
  return v_row, v_col, v, m


def _leaf_update(g, p, v_row, v_col, v, m, plan, lr, beta2, hp):
  """Adafactor step for one parameter; returns (update, v_row, v_col, v, m)."""
  g = g.astype(jnp.float32)
  g2 = g * g + hp['epsilon1']
  avg = plan.averaging_dims(g.ndim)
  if plan.factored:
    v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(g2, axis=plan.cols)
    v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(g2, axis=plan.rows)
    rows_in_v_row = tuple(r - sum(c < r for c in plan.cols) for r in plan.rows)
    # v_hat = v_row ⊗ v_col / mean(v_row): rank-1 estimate of the second moment per batch slice.
    row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=rows_in_v_row, keepdims=True))
    y = (g * jnp.expand_dims(row_factor, plan.cols) *
         jnp.expand_dims(jax.lax.rsqrt(v_col), plan.rows))
  else:
    v = beta2 * v + (1.0 - beta2) * g2
    y = g * jax.lax.rsqrt(v)
  if hp['clipping_threshold'] is not None:
    rms = jnp.sqrt(jnp.mean(y * y, axis=avg, keepdims=True))
    y = y / jnp.maximum(1.0, rms / hp['clipping_threshold'])
  scale = lr
  if hp['multiply_by_parameter_scale']:
    p32 = p.astype(jnp.float32)
    scale = lr * jnp.maximum(jnp.sqrt(jnp.mean(p32 * p32, axis=avg, keepdims=True)),
                             hp['epsilon2'])
  u = scale * y
  if hp['beta1'] is not None:
    u = hp['beta1'] * m.astype(jnp.float32) + (1.0 - hp['beta1']) * u
    m = u.astype(hp['momentum_dtype'])
  if hp['weight_decay_rate']:
    # t5x decays by the rate itself, not rate * lr.
    u = u + hp['weight_decay_rate'] * p.astype(jnp.float32)
  return -u, v_row, v_col, v, m


def _map_leaves(fn, tree, *others, n_out):
  """Applies fn(path, leaf, *other_leaves) -> n_out-tuple; returns n_out trees shaped like tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rest = [treedef.flatten_up_to(o) for o in others]
  outs = [fn(path, x, *r) for (path, x), *r in zip(flat, *rest)]
  columns = list(zip(*outs)) if outs else [()] * n_out
  return [jax.tree.unflatten(treedef, list(c)) for c in columns]


def adafactor(learning_rate: ScalarOrSchedule, *, decay_rate: float = 0.8, step_offset: int = 0,
              beta1: Optional[float] = None, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, epsilon1: float = 1e-30,
              epsilon2: float = 1e-3, min_dim_size_to_factor: int = 128, factored: bool = True,
              weight_decay_rate: Optional[float] = None,
              logical_axes_fn: Optional[LogicalAxesFn] = None,
              factor_rules: Mapping[str, str] = FACTOR_RULES,
              momentum_dtype=jnp.float32) -> optax.GradientTransformation:
  """t5x-semantics Adafactor; defaults are OpenMoE's (XueFuzhao/t5x `t5x/adafactor.py`).

  At update t (0 first): beta2 = 1 - (t - step_offset + 1)^-decay_rate; second moment v of
  grad^2 + epsilon1, factored per `factor_plan`; y = grad / sqrt(v); y /= max(1, RMS(y) /
  clipping_threshold); update = -lr(t) * max(RMS(param), epsilon2) * y (RMS over non-batch dims;
  the param scale only if multiply_by_parameter_scale). Then momentum m = beta1 * m +
  (1 - beta1) * update, and weight decay -weight_decay_rate * param (not times lr, as in t5x);
  None for clipping_threshold, beta1 or weight_decay_rate turns that part off.

  Args:
    learning_rate: a float or an optax schedule of the update count.
    min_dim_size_to_factor, factored, logical_axes_fn, factor_rules: see `factor_plan`.
    momentum_dtype: dtype of the momentum buffer. Other args: see the formula above.

  Returns:
    An optax GradientTransformation; `update` needs `params` when parameter scaling or weight
    decay is on. Factoring is decided from paths and shapes at trace time.
  """
  hp = dict(beta1=beta1, clipping_threshold=clipping_threshold, epsilon1=epsilon1,
            epsilon2=epsilon2, multiply_by_parameter_scale=multiply_by_parameter_scale,
            weight_decay_rate=weight_decay_rate, momentum_dtype=momentum_dtype)
  plan = functools.partial(factor_plan, logical_axes_fn=logical_axes_fn, factor_rules=factor_rules,
                           min_dim_size_to_factor=min_dim_size_to_factor, factored=factored)

  def init_fn(params):
    fields = _map_leaves(lambda path, p: _leaf_init(p, plan(path, p.shape), beta1,
                                                    momentum_dtype), params, n_out=4)
    return AdafactorState(jnp.zeros([], jnp.int32), *fields)

  def update_fn(updates, state, params=None):
    if params is None and (multiply_by_parameter_scale or weight_decay_rate):
      raise ValueError('adafactor.update needs params for parameter scaling / weight decay.')
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    beta2 = 1.0 - (state.count - step_offset + 1).astype(jnp.float32) ** (-decay_rate)

    def leaf(path, g, p, *moments):
      u, *new_moments = _leaf_update(g, p, *moments, plan(path, g.shape), lr, beta2, hp)
      return (u.astype(g.dtype), *new_moments)

    new_updates, *fields = _map_leaves(leaf, updates, updates if params is None else params,
                                       *state[1:], n_out=5)
    return new_updates, AdafactorState(optax.safe_increment(state.count), *fields)

  return optax.GradientTransformation(init_fn, update_fn)


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
  """t5x 'constant * rsqrt_decay': lr(step) = base / sqrt(max(step, warmup_steps)); with the
  OpenMoE defaults, 0.01 for the first 10K steps (no ramp), then 1 / sqrt(step)."""
  if warmup_steps < 1:
    raise ValueError(f'warmup_steps must be >= 1 (lr would be infinite at step 0): {warmup_steps}')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))
  return schedule


# Per-schedule defaults of (base_learning_rate, warmup_steps). rsqrt / constant: OpenMoE (the
# constant is its 0.01 plateau); cosine: a common AdamW recipe, not from OpenMoE.
_SCHEDULE_DEFAULTS = {'rsqrt': (1.0, 10_000), 'constant': (0.01, 0), 'cosine': (3e-4, 2_000)}


def make_schedule(name: str = 'rsqrt', *, base_learning_rate: Optional[float] = None,
                  warmup_steps: Optional[int] = None, decay_steps: Optional[int] = None,
                  end_learning_rate_fraction: float = 0.1) -> optax.Schedule:
  """Learning-rate schedule by name.

  Args:
    name: 'rsqrt' (base / sqrt(max(step, warmup)); defaults 1.0, 10000), 'constant' (base;
      default 0.01) or 'cosine' (linear warmup 0 -> base, then cosine decay to
      base * end_learning_rate_fraction at `decay_steps`; defaults 3e-4, 2000).
    base_learning_rate, warmup_steps: None takes the schedule's default.
    decay_steps: cosine only: total schedule length including warmup (usually TRAIN_STEPS).
    end_learning_rate_fraction: cosine only: final LR as a fraction of the peak.

  Returns:
    step -> f32[] learning rate.
  """
  if name not in _SCHEDULE_DEFAULTS:
    raise ValueError(f'Unknown schedule {name!r}; expected one of {sorted(_SCHEDULE_DEFAULTS)}.')
  default_lr, default_warmup = _SCHEDULE_DEFAULTS[name]
  lr = default_lr if base_learning_rate is None else base_learning_rate
  warmup = default_warmup if warmup_steps is None else warmup_steps
  if name == 'rsqrt':
    return rsqrt_schedule(lr, warmup)
  if name == 'constant':
    return optax.constant_schedule(lr)
  if decay_steps is None or decay_steps <= warmup:
    raise ValueError(f'cosine needs decay_steps ({decay_steps}, usually TRAIN_STEPS) > '
                     f'warmup_steps ({warmup}): lower warmup_steps in OPTIMIZER_KWARGS '
                     '(quickstart.gin: --gin.WARMUP_STEPS=N) or raise decay_steps')
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps,
                                            end_value=lr * end_learning_rate_fraction)


def adamw(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1) -> optax.GradientTransformation:
  """optax AdamW; weight decay skips rank-1 parameters (norm scales, biases)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))


def make_optimizer(name: str = 'adafactor',
                   learning_rate_schedule: Union[str, optax.Schedule, None] = None, *,
                   base_learning_rate: Optional[float] = None, warmup_steps: Optional[int] = None,
                   decay_steps: Optional[int] = None, end_learning_rate_fraction: float = 0.1,
                   grad_clip_norm: Optional[float] = None,
                   param_axes: Optional[Mapping[str, Sequence[Optional[str]]]] = None,
                   **hyper) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Optimizer factory for the train loop (gin binds its keyword args).

  Defaults give OpenMoE's recipe: Adafactor (decay 0.8, no momentum, update clipping 1.0,
  parameter scaling, MoE-aware factoring) with lr = 1 / sqrt(max(step, 10000)), no weight decay
  and no global-norm clipping.

  Args:
    name: 'adafactor' or 'adamw'.
    learning_rate_schedule: a schedule name for `make_schedule` or a callable step -> lr; None
      means 'rsqrt' for adafactor and 'cosine' for adamw.
    base_learning_rate, warmup_steps, decay_steps, end_learning_rate_fraction: see
      `make_schedule`.
    grad_clip_norm: clip gradients to this global norm first (a chain), or None (OpenMoE).
    param_axes: Adafactor: path -> logical axes of every parameter (`steps.param_axes(cfg)`),
      which decide the factored dims with `FACTOR_RULES` as in t5x; None uses optax's
      two-largest-dims heuristic.
    **hyper: keyword args of `adafactor` or `adamw` (unknown names raise TypeError).

  Returns:
    (transformation, schedule); the schedule is for logging the LR of a step.
  """
  if name not in ('adafactor', 'adamw'):
    raise ValueError(f"Unknown optimizer {name!r}; expected 'adafactor' or 'adamw'.")
  schedule = learning_rate_schedule or ('rsqrt' if name == 'adafactor' else 'cosine')
  if not callable(schedule):
    schedule = make_schedule(schedule, base_learning_rate=base_learning_rate,
                             warmup_steps=warmup_steps, decay_steps=decay_steps,
                             end_learning_rate_fraction=end_learning_rate_fraction)
  if name == 'adafactor' and param_axes is not None:
    hyper.setdefault('logical_axes_fn', axes_from_params(param_axes))
  tx = (adafactor if name == 'adafactor' else adamw)(schedule, **hyper)
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx, schedule


def state_partition_specs(opt_state, params, param_specs, *,
                          logical_axes_fn: Optional[LogicalAxesFn] = None,
                          factor_rules: Mapping[str, str] = FACTOR_RULES):
  """PartitionSpecs for an optimizer state, derived from the parameters' specs.

  Works for `make_optimizer` states (Adafactor, AdamW, either in a clipping chain): leaves shaped
  like their parameter take its spec; Adafactor's v_row / v_col drop the spec entry of the
  reduced dims (so [E, D] stays sharded over E); scalars and placeholders are replicated. Pass
  the same `factor_rules` as to the optimizer; the factored dims come from `logical_axes_fn`,
  by default from `param_specs` themselves when they hold logical axis names (the model's
  annotations, as `layout.state_layout` passes them).

  Args:
    opt_state: the state or its `jax.eval_shape` abstraction.
    params: the parameters (arrays or ShapeDtypeStructs).
    param_specs: PartitionSpecs with the structure of `params`.

  Returns:
    PartitionSpecs with the structure of `opt_state`.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  by_path = {}
  for (path, p), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(param_specs, is_leaf=is_spec)):
    by_path[path_str(path)] = (p.shape, tuple(spec) + (None,) * (len(p.shape) - len(spec)))
  if logical_axes_fn is None and all(
      all(a is None or a in factor_rules for a in spec) for _, spec in by_path.values()):
    logical_axes_fn = axes_from_params({k: spec for k, (_, spec) in by_path.items()})

  def leaf_spec(path, leaf):
    parts = path_str(path).split('/')
    # The longest suffix of the state path that names a parameter; the part before it is the
    # state field (v_row, mu, ...).
    i = next((i for i in range(len(parts)) if '/'.join(parts[i:]) in by_path), None)
    if i is None:
      return PartitionSpec()
    key, field = '/'.join(parts[i:]), parts[i - 1] if i else ''
    shape, spec = by_path[key]
    if tuple(leaf.shape) == tuple(shape):
      return PartitionSpec(*spec)
    plan = factor_plan(key, shape, logical_axes_fn=logical_axes_fn, factor_rules=factor_rules,
                       min_dim_size_to_factor=0)
    dropped = {'v_row': plan.cols, 'v_col': plan.rows}.get(field)
    kept_shape = tuple(n for d, n in enumerate(shape) if d not in (dropped or ()))
    # Placeholders (unfactored parameters keep f32[1] in v_row / v_col) are replicated.
    if not plan.factored or dropped is None or tuple(leaf.shape) != kept_shape:
      return PartitionSpec()
    return PartitionSpec(*[s for d, s in enumerate(spec) if d not in dropped])

  return jax.tree_util.tree_map_with_path(leaf_spec, opt_state)
