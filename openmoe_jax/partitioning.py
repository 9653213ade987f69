"""Logical axis names and the one table mapping them to the (data, expert, model) mesh.

Layers name the axes of every parameter and constrained activation with the constants below;
only this module knows how they map to mesh axes (t5x MoE rules, see PEERS.md).
"""
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
)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(axes))


def param_init(init, axes: Sequence[Optional[str]]):
  """Wraps an initialiser so the parameter carries its logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def unbox(tree):
  """Strips the logical-axis metadata boxes from a variables/params tree."""
  return nn.meta.unbox(tree)


def logical_axes(boxed_tree):
  """Logical axis names of every parameter (a tree of tuples matching the params tree)."""
  return nn.get_partition_spec(boxed_tree)
