"""Where the training state lives: its shardings and abstract shapes on a mesh, and the
ahead-of-time compilation of the training step (no parameter memory allocated).
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from openmoe_jax.data import pipeline as data
from openmoe_jax.model import partitioning as part
from openmoe_jax.training import expert_bias, steps
from openmoe_jax.training.optimizer import state_partition_specs


def state_layout(init_fn: Callable, mesh, rng, rules=part.LOGICAL_AXIS_RULES):
  """(state shardings, abstract state with those shardings) for `init_fn(rng)`'s boxed state."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, rng)
    param_specs = nn.get_partition_spec(boxed["params"])
    opt_specs = state_partition_specs(boxed["opt_state"], part.unbox(boxed["params"]),
                                      param_specs)
    state_sh = {"step": NamedSharding(mesh, PartitionSpec()),
                "params": part.mesh_shardings(boxed["params"], mesh, rules),
                "opt_state": nn.logical_to_mesh_sharding(opt_specs, mesh, rules)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          part.unbox(boxed), state_sh)
  return state_sh, abstract


def abstract_batch(mesh, batch_size: int, length: int, rules=part.LOGICAL_AXIS_RULES):
  """ShapeDtypeStructs of one global training batch, sharded as the training loop shards it."""
  batch_sh = part.batch_sharding(mesh, rules=rules)
  return {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32 if "weights" not in k
                                  else jnp.float32, sharding=batch_sh)
          for k in data.BATCH_KEYS}


def jit_train_step(cfg, tx, schedule, state_sh, batch_sh, *, num_microbatches: int = 1,
                   seed: int = 0):
  """The jitted train step, with its shardings and the state donated: the one definition the
  training loop runs and the ahead-of-time compile (`lower_train_step`) measures."""
  return jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, tx=tx, schedule=schedule,
                                               num_microbatches=num_microbatches, seed=seed),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=(0,))


def lower_train_step(cfg, tx, schedule, mesh, *, batch_size: int, length: int,
                     num_microbatches: int = 1, seed: int = 0, rules=part.LOGICAL_AXIS_RULES):
  """(the jitted step exactly as the training loop builds it, lowered for `mesh` from abstract
  shapes, the abstract state)."""
  init_fn = lambda rng: steps.init_state(cfg, tx, rng, batch_size // num_microbatches, length)
  state_sh, abstract = state_layout(init_fn, mesh, jax.random.key(seed), rules)
  fn = jit_train_step(cfg, tx, schedule, state_sh, part.batch_sharding(mesh, rules=rules),
                      num_microbatches=num_microbatches, seed=seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return fn.lower(abstract, abstract_batch(mesh, batch_size, length, rules)), abstract


def lower_update(tx, mesh, abstract_state, rules=part.LOGICAL_AXIS_RULES):
  """The optimizer update alone (gradients shaped and sharded like the parameters), lowered:
  the part of a train step that runs once per step, not once per microbatch."""
  import optax
  shard = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  state_sh = shard(abstract_state)

  def update(state, grads):
    trained, biases = expert_bias.split(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], trained)
    params = expert_bias.merge(optax.apply_updates(trained, updates), biases)
    return {"step": state["step"] + 1, "params": params,
            "opt_state": opt_state}, optax.global_norm(grads)

  grads = expert_bias.trainable(abstract_state["params"])
  fn = jax.jit(update, in_shardings=(state_sh, expert_bias.trainable(state_sh["params"])),
               out_shardings=(state_sh, None), donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return fn.lower(abstract_state, grads)


def cost(compiled) -> Dict[str, float]:
  """The compiler's cost analysis as a plain dict ({} when the backend has none)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return dict(c or {})


def memory(compiled) -> Dict[str, int]:
  """Per-device bytes of a compiled program; donated state is aliased to the output, so it is
  counted once in the peak."""
  mem = compiled.memory_analysis()
  out = {
      "argument_bytes_per_device": int(mem.argument_size_in_bytes),
      "output_bytes_per_device": int(mem.output_size_in_bytes),
      "temp_bytes_per_device": int(mem.temp_size_in_bytes),
      "alias_bytes_per_device": int(getattr(mem, "alias_size_in_bytes", 0)),
  }
  out["peak_bytes_per_device"] = (out["argument_bytes_per_device"] + out["output_bytes_per_device"]
                                  - out["alias_bytes_per_device"] + out["temp_bytes_per_device"])
  return out


def compile_train_step(cfg, tx, schedule, mesh, *, batch_size: int, length: int,
                       num_microbatches: int = 1, rules=part.LOGICAL_AXIS_RULES,
                       seed: int = 0) -> Dict[str, float]:
  """Lowers and compiles the full train step for `mesh` from abstract shapes only.

  Returns per-device memory (bytes) and FLOPs from the compiled program, and compile seconds.
  """
  import time
  t = time.perf_counter()
  lowered, _ = lower_train_step(cfg, tx, schedule, mesh, batch_size=batch_size, length=length,
                                num_microbatches=num_microbatches, seed=seed, rules=rules)
  compiled = lowered.compile()
  out = {"compile_seconds": time.perf_counter() - t, **memory(compiled)}
  # XLA counts a loop body once, so with microbatches this is one microbatch's step.
  out["xla_flops_per_device"] = float(cost(compiled).get("flops", 0.0))
  return out
