"""Tiny-model training step on 8 fake CPU devices: step time on each mesh relative to one device.

    .venv/bin/python benchmarks/mesh_step_time.py [--steps 10]

Fake devices share the host's cores, so this measures partitioning overhead (collectives,
resharding, padding), not speed-up. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per mesh")
  parser.add_argument("--batch_size", type=int, default=16, help="global batch (sequences)")
  parser.add_argument("--length", type=int, default=128, help="sequence length")
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  from openmoe_jax.training import state_layout as layout
  from openmoe_jax.model import partitioning as part
  from flax import linen as nn
  from openmoe_jax.model.config import ModelConfig
  from openmoe_jax.training import run_setup
  cfg = ModelConfig(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                    expert_mlp_dim=128, num_layers=4, num_experts=8, num_sparse_layers=2,
                    group_size=256, activation_dtype="float32")
  rng = jax.random.key(0)
  tokens = jax.random.randint(rng, (args.batch_size, args.length), 1, cfg.vocab_size)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
           "decoder_loss_weights": jnp.ones(tokens.shape, jnp.float32),
           "decoder_segment_ids": jnp.ones_like(tokens),
           "decoder_positions": jnp.broadcast_to(jnp.arange(args.length), tokens.shape)}
  results = {}
  for expert, model, devices in [(1, 1, 1), (1, 1, 8), (8, 1, 8), (4, 1, 8), (2, 2, 8)]:
    # Set up as train() sets up a run on this mesh (routing replicas = the data axis).
    run = run_setup.build(cfg, batch_size=args.batch_size, seq_len=args.length,
                          num_expert_partitions=expert, num_model_partitions=model,
                          devices=jax.devices()[:devices])
    mesh = run.mesh
    state_sh, _ = run.state_layout()
    batch_sh = run.batch_sharding()
    with jax.set_mesh(mesh), nn.logical_axis_rules(run.rules):
      state = jax.jit(lambda r: part.unbox(run.init_fn(r)), out_shardings=state_sh)(rng)
      fn = layout.jit_train_step(run.cfg, run.tx, run.schedule, state_sh, batch_sh)
      b = jax.device_put(batch, batch_sh)
      state, m = fn(state, b)
      jax.block_until_ready(m)
      times = []
      for _ in range(args.steps):
        t = time.perf_counter()
        state, m = fn(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    name = f"devices={devices},data={mesh.shape['data']},expert={expert},model={model}"
    results[name] = statistics.median(times)
  base = results["devices=1,data=1,expert=1,model=1"]
  print(json.dumps({k: {"seconds": v, "relative_to_one_device": v / base}
                    for k, v in results.items()}, indent=2))


if __name__ == "__main__":
  main()
