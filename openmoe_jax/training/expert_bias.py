"""Auxiliary-loss-free balancing: the per-expert selection bias as training state.

DeepSeek-V3 (arXiv:2412.19437, section 2.1.2) adds a bias b_e to the router scores for the
choice of experts only (`routers.select`; the gates stay the unbiased scores) and, after every
step, moves it towards balance:

    b_e <- b_e + u * sign(mean_e(load) - load_e)

with load_e the assignments expert e was chosen for in the step, counted over the **global**
batch (every data- and expert-parallel device, every microbatch: Megatron-Core
`megatron/core/transformer/moe/moe_utils.py` `get_updated_expert_bias` all-reduces the counts;
under our SPMD step the sums over the sharded batch are global already). u is
`ModelConfig.expert_bias_update_rate` (gin `EXPERT_BIAS_UPDATE_RATE`).

The bias lives in the parameter tree, at `decoder/layers_{i}/mlp/expert_bias` float32[E] for
every MoE layer i, so checkpoints, resume, evaluation, decoding, analysis and export carry it
like any weight; but it is not trained: the model reads it through `stop_gradient`, the
optimizer never sees it (`split` takes it out before `tx.init` / `tx.update`) and this module's
`updated` is the only thing that changes it.
"""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

NAME = "expert_bias"  # the parameter's name inside each MoE layer's `mlp`


def _is_bias(path: tuple) -> bool:
  return bool(path) and path[-1] == NAME


def split(params) -> Tuple[dict, Dict[tuple, jax.Array]]:
  """(params without the expert biases, {flat path: bias}); ({...}, {}) for a model without."""
  flat = traverse_util.flatten_dict(params)
  rest = {k: v for k, v in flat.items() if not _is_bias(k)}
  if len(rest) == len(flat):
    return params, {}
  return traverse_util.unflatten_dict(rest), {k: v for k, v in flat.items() if _is_bias(k)}


def merge(rest, biases: Dict[tuple, jax.Array]):
  """The inverse of `split`."""
  if not biases:
    return rest
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(rest), **biases})


def trainable(params):
  """The parameters the optimizer updates (all but the expert biases)."""
  return split(params)[0]


def layer_path(layer: int) -> tuple:
  return ("decoder", f"layers_{layer}", "mlp", NAME)


def updated(biases: Dict[tuple, jax.Array], counts: jax.Array, rate: float,
            moe_layers) -> Dict[tuple, jax.Array]:
  """Every MoE layer's bias after one step.

  Args:
    biases: {layer_path(i): float32[E]} (from `split`).
    counts: float32[len(moe_layers), E] assignments chosen per expert in the step (any positive
      multiple of the counts gives the same signs: a mean over microbatches is fine).
    rate: u.
    moe_layers: the MoE layers' indices in the order of `counts`' rows.
  """
  out = {}
  for row, layer in enumerate(moe_layers):
    load = counts[row].astype(jnp.float32)
    bias = biases[layer_path(layer)]
    out[layer_path(layer)] = bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)
  return out


def abs_max(biases: Dict[tuple, jax.Array]) -> jax.Array:
  """float32[]: the largest |b_e| over every layer (metric `moe/expert_bias_abs_max`)."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b in biases.values()]))
