"""Logical axis names and the one table mapping them to the (data, expert, model) mesh.

Layers name the axes of every parameter and constrained activation with the constants below;
only this module knows how they map to mesh axes (t5x `t5x/contrib/moe/partitioning.py`'s MoE rules).
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "expert", "model")

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
JOINED_KV = "joined_kv"
VOCAB = "vocab"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"
MLP_EMBED = "mlp_embed"
EXPERT_REPLICAS = "expert_replicas"
UNMODELED = "unmodeled"
# The compressed widths of multi-head latent attention (mla.py): as the down projections'
# output (and the latent norms) and as the up projections' input (two names, as embed and
# mlp_embed, so that Adafactor factors both kernels).
LORA = "lora"
LORA_IN = "lora_in"

LOGICAL_AXIS_RULES = (
    (BATCH, ("data", "expert")),
    (LENGTH, None),
    (EMBED, None),
    (MLP, "model"),
    (HEADS, "model"),
    (KV, None),
    (JOINED_KV, "model"),
    (VOCAB, "model"),
    (EXPERT, "expert"),
    (EXPERT_MLP, "model"),
    (MLP_EMBED, None),
    (EXPERT_REPLICAS, "data"),
    (UNMODELED, None),
    (LORA, None),
    (LORA_IN, None),
)


def axis_rules(overrides: Sequence = ()) -> tuple:
  """LOGICAL_AXIS_RULES with `overrides` replacing entries by logical name.

  The commands read it from gin (`commands/configurables.py`) and pass the result on; for
  FSDP-style sharding of parameters and optimizer state over `data` too, bind
  `openmoe_jax.partitioning.axis_rules.overrides = [('embed', 'data')]`. Functions below that
  take `rules` use LOGICAL_AXIS_RULES when given none.
  """
  table = dict(LOGICAL_AXIS_RULES)
  for name, mesh_axes in overrides:
    if name not in table:
      raise ValueError(f"axis_rules: unknown logical axis {name!r}; known: {sorted(table)}")
    table[name] = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
  return tuple(table.items())


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(axes))


def param_init(init, axes: Sequence[Optional[str]]):
  """Wraps an initialiser so the parameter carries its logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def unbox(tree):
  """Strips the logical-axis metadata boxes from a variables/params tree (no constraints: the
  caller places the result with explicit shardings)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def logical_axes(boxed_tree):
  """Logical axis names of every parameter (a tree of tuples matching the params tree)."""
  return nn.get_partition_spec(boxed_tree)


def make_mesh(num_expert_partitions: int = 1, num_model_partitions: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """(data, expert, model) mesh over all devices of all processes; data takes the rest.

  OpenMoE's macros: NUM_EXPERT_PARTITIONS, NUM_MODEL_PARTITIONS.
  """
  import numpy as np
  devices = jax.devices() if devices is None else devices
  n, e, m = len(devices), num_expert_partitions, num_model_partitions
  if e <= 0 or m <= 0 or n % (e * m):
    raise ValueError(f"mesh: {n} devices cannot be split into expert={e} x model={m} partitions "
                     f"(expert*model={e * m} must divide {n})")
  shape = (n // (e * m), e, m)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU and uncommon topologies: plain order is as good as any
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, MESH_AXES)


def check_experts_divisible(num_experts: int, mesh: jax.sharding.Mesh) -> None:
  e = mesh.shape["expert"]
  if num_experts and num_experts % e:
    raise ValueError(f"mesh: NUM_EXPERTS={num_experts} is not divisible by the expert "
                     f"partitions {e}")


def mesh_shardings(boxed_abstract_tree, mesh, rules=None):
  """NamedShardings from the logical names carried by an (abstract) boxed params tree."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES if rules is None else rules)


def mesh_axes_of(logical: str, rules=None) -> tuple:
  """The mesh axes a logical axis maps to under the rules (a tuple, empty when replicated)."""
  axes = dict(LOGICAL_AXIS_RULES if rules is None else rules).get(logical)
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def batch_shards(mesh, rules=None) -> int:
  """How many ways the batch is split: the product of the mesh axes `batch` maps to."""
  return math.prod(mesh.shape[a] for a in mesh_axes_of(BATCH, rules))


def check_batch_divisible(batch_size: int, mesh, num_microbatches: int = 1,
                          name: str = "BATCH_SIZE", rules=None) -> None:
  """ValueError unless every microbatch splits evenly over the batch's mesh axes."""
  shards = batch_shards(mesh, rules)
  if batch_size % (shards * num_microbatches):
    axes = "*".join(mesh_axes_of(BATCH, rules)) or "no"
    raise ValueError(f"{name}={batch_size} must be divisible by the batch partitions "
                     f"({axes} = {shards}) x num_microbatches ({num_microbatches})")


def batch_sharding(mesh, ndim: int = 2, rules=None) -> jax.sharding.NamedSharding:
  """Batches split as the rules say `batch` splits (t5x MoE rule batch -> (data, expert))."""
  spec = jax.sharding.PartitionSpec(mesh_axes_of(BATCH, rules) or None, *([None] * (ndim - 1)))
  return jax.sharding.NamedSharding(mesh, spec)


def logical_axis_size(logical: str) -> int:
  """Devices a logical axis is split over in the current mesh and rules context (1 outside
  a mesh), e.g. the expert-parallel size for `EXPERT`."""
  mesh = jax.sharding.get_abstract_mesh()
  axis = nn.logical_to_mesh_axes((logical,))[0]
  if mesh.empty or axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[name] for name in names)
