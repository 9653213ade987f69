"""What a run's training step needs, built in one place from the run's settings: the mesh, the
routing replicas, the partitioning rules, the optimizer and the state's layout.

`train()`, the TPU plan (`openmoe-train --compile_only`, `openmoe-info --tpu`), `openmoe-info
--compile` and `benchmarks/train_step.py` all call `build`, so a plan is the plan of the run and a
check (experts over the mesh, batch over its partitions, parameters over theirs, the optimizer's
arguments) fails the same way, with one line, wherever it runs.
"""
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax

from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.model import attention
from openmoe_jax.model import partitioning as part
from openmoe_jax.model import ragged_dispatch
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.training import state_layout as layout
from openmoe_jax.training import steps
from openmoe_jax.training.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """The pieces of one run's training step (see `build`)."""
  cfg: ModelConfig          # the model, with the run's routing replicas (`num_expert_replicas`)
  mesh: jax.sharding.Mesh   # (data, expert, model)
  rules: tuple              # logical axis -> mesh axes (`partitioning.axis_rules`)
  tx: Any                   # optax transformation (`OPTIMIZER`, `OPTIMIZER_KWARGS`)
  schedule: Callable        # learning rate of the step
  optimizer: str
  optimizer_kwargs: dict
  batch_size: int           # global, in sequences
  seq_len: int
  num_microbatches: int

  def init_fn(self, rng):
    """The boxed initial state of one microbatch's shapes (`steps.init_state`)."""
    return steps.init_state(self.cfg, self.tx, rng, self.batch_size // self.num_microbatches,
                            self.seq_len)

  def state_layout(self, seed: int = 0):
    """(state shardings, abstract state); UsageError when a parameter dimension does not split
    over its mesh axes."""
    state_sh, abstract = layout.state_layout(self.init_fn, self.mesh, jax.random.key(seed),
                                             self.rules)
    check_params_divisible(abstract["params"], self.mesh)
    return state_sh, abstract

  def batch_sharding(self):
    return part.batch_sharding(self.mesh, rules=self.rules)

  def with_step_offset(self, step_offset: int):
    """The optimizer applying the schedule at update count + step_offset (a fine-tuning run
    continues its step with a fresh optimizer state, as in t5x); the schedule stays the step's."""
    if not step_offset:
      return self.tx
    return make_tx(self.optimizer, self.optimizer_kwargs, steps.param_axes(self.cfg),
                   step_offset=step_offset)[0]


def build(cfg: ModelConfig, *, batch_size: int, seq_len: int, num_expert_partitions: int = 1,
          num_model_partitions: int = 1, num_microbatches: int = 1,
          optimizer: str = "adafactor", optimizer_kwargs: Optional[dict] = None,
          num_expert_replicas: Optional[int] = None, rules: Optional[Sequence] = None,
          devices=None, batch_name: str = "BATCH_SIZE", where: str = "") -> StepSetup:
  """Checks a run's settings against its devices and builds its step's pieces.

  num_expert_replicas: the routing-group constraint (groups are a multiple of experts x
    replicas, so they split over (data, expert), as flaxformer); default: the data axis.
  rules: the partitioning rules (default `partitioning.LOGICAL_AXIS_RULES`); the commands pass
    the gin-bound `axis_rules()`.
  devices: the mesh's devices (default: every device of every process).
  batch_name, where: how the errors name the batch size and the devices (e.g. " on v3-256").
  Raises UsageError (one line) on a bad mesh, experts, batch or optimizer.
  """
  rules = tuple(part.LOGICAL_AXIS_RULES if rules is None else rules)
  try:
    mesh = part.make_mesh(num_expert_partitions, num_model_partitions, devices=devices)
    part.check_experts_divisible(cfg.num_experts, mesh)
    part.check_batch_divisible(batch_size, mesh, num_microbatches, name=batch_name, rules=rules)
    attention.check_run(cfg, seq_len)
    ragged_dispatch.check_exchange(cfg)
  except ValueError as e:
    raise UsageError(error_line(e) + where) from None
  cfg = cfg.replace(num_expert_replicas=num_expert_replicas or mesh.shape["data"])
  optimizer_kwargs = dict(optimizer_kwargs or {})
  tx, schedule = make_tx(optimizer, optimizer_kwargs, steps.param_axes(cfg))
  return StepSetup(cfg=cfg, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
                   optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
                   batch_size=batch_size, seq_len=seq_len, num_microbatches=num_microbatches)


def make_tx(name: str, kwargs: dict, param_axes=None, step_offset: int = 0):
  """(transformation, schedule) of `make_optimizer(name, **kwargs)`, Adafactor factored by
  `param_axes` (the parameters' logical axes, `steps.param_axes`); bad OPTIMIZER /
  OPTIMIZER_KWARGS are UsageErrors. With `step_offset`, the transformation applies the schedule
  at update count + step_offset; the returned schedule is still the plain one, of the step."""
  try:
    tx, schedule = make_optimizer(name, param_axes=param_axes, **kwargs)
    if step_offset:
      shifted = lambda count: schedule(count + step_offset)
      tx, _ = make_optimizer(name, param_axes=param_axes,
                             **dict(kwargs, learning_rate_schedule=shifted))
  except (ValueError, TypeError) as e:  # make_optimizer only validates its arguments here
    raise UsageError(f"OPTIMIZER / OPTIMIZER_KWARGS: {error_line(e)}") from None
  return tx, schedule


def check_params_divisible(params, mesh) -> None:
  """UsageError when a parameter dimension does not split over its mesh axes."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      n = math.prod(mesh.shape[a] for a in names)
      if size % n:
        raise UsageError(
            f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')} "
            f"{tuple(leaf.shape)}: dimension {dim} ({size}) is not divisible by its {n} "
            f"partitions over {'x'.join(names)}; choose sizes divisible by NUM_MODEL_PARTITIONS "
            "(MLP_DIM, EXPERT_MLP_DIM, NUM_HEADS x HEAD_DIM, NUM_EMBEDDINGS) or fewer partitions")
