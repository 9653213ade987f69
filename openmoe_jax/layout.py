"""Where the training state lives: its shardings and abstract shapes on a mesh, and the
ahead-of-time compilation of the training step (no parameter memory allocated).
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from openmoe_jax import data
from openmoe_jax import partitioning as part
from openmoe_jax import steps
from openmoe_jax.optimizer import state_partition_specs


def state_layout(init_fn: Callable, mesh, rng):
  """(state shardings, abstract state with those shardings) for `init_fn(rng)`'s boxed state."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.axis_rules()):
    boxed = jax.eval_shape(init_fn, rng)
    param_specs = nn.get_partition_spec(boxed["params"])
    opt_specs = state_partition_specs(boxed["opt_state"], part.unbox(boxed["params"]),
                                      param_specs)
    state_sh = {"step": NamedSharding(mesh, PartitionSpec()),
                "params": part.mesh_shardings(boxed["params"], mesh),
                "opt_state": nn.logical_to_mesh_sharding(opt_specs, mesh,
                                                         part.axis_rules())}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          part.unbox(boxed), state_sh)
  return state_sh, abstract


def compile_train_step(cfg, tx, schedule, mesh, *, batch_size: int, length: int,
                       num_microbatches: int = 1) -> Dict[str, float]:
  """Lowers and compiles the full train step for `mesh` from abstract shapes only.

  Returns per-device memory (bytes) and FLOPs from the compiled program, and compile seconds.
  """
  import time
  init_fn = lambda rng: steps.init_state(cfg, tx, rng, batch_size // num_microbatches, length)
  state_sh, abstract = state_layout(init_fn, mesh, jax.random.key(0))
  batch_sh = part.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32 if "weights" not in k
                                   else jnp.float32, sharding=batch_sh)
           for k in data.BATCH_KEYS}
  fn = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, tx=tx, schedule=schedule,
                                             num_microbatches=num_microbatches),
               in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
               donate_argnums=(0,))
  t = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(part.axis_rules()):
    compiled = fn.lower(abstract, batch).compile()
  seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "compile_seconds": seconds,
      "argument_bytes_per_device": int(mem.argument_size_in_bytes),
      "output_bytes_per_device": int(mem.output_size_in_bytes),
      "temp_bytes_per_device": int(mem.temp_size_in_bytes),
      "alias_bytes_per_device": int(getattr(mem, "alias_size_in_bytes", 0)),
      # XLA counts a loop body once, so with microbatches this is one microbatch's step.
      "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
  }
  # Donated state is aliased to the output, so it is counted once.
  out["peak_bytes_per_device"] = (out["argument_bytes_per_device"] + out["output_bytes_per_device"]
                                  - out["alias_bytes_per_device"] + out["temp_bytes_per_device"])
  return out
