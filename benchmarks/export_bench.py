"""openmoe-export throughput and peak resident memory on a ~1B-parameter OpenMoE built here.

    .venv/bin/python benchmarks/export_bench.py [--work_dir=/tmp/export_bench] [--dtype=float32]

Builds a checkpoint of random parameters (vocab 256384, d 1024, 8 layers, 2 MoE layers of 16
experts: ~1.0B parameters, 4 GB in float32) with our Checkpointer, then runs `openmoe-export`
in a child process and reports its wall time, MB/s written and peak RSS (ru_maxrss), next to the
largest single tensor and the RSS of a child that only imports the same libraries and opens the
checkpoint metadata (the fixed cost).
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

CFG = dict(vocab_size=256384, emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
           expert_mlp_dim=2816, num_layers=8, num_experts=16, num_sparse_layers=2)


def build(model_dir):
  import jax
  from openmoe_jax.training import checkpoint as ckpt_lib
  from openmoe_jax.model.config import ModelConfig
  from openmoe_jax.model.counts import abstract_params
  cfg = ModelConfig(**CFG)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02,
                        abstract_params(cfg))
  os.makedirs(model_dir)
  with open(os.path.join(model_dir, "model_config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f)
  with ckpt_lib.Checkpointer(model_dir, async_save=False) as c:
    c.save(1, {"step": np.int32(1), "params": params, "opt_state": {}}, {}, force=True)
  sizes = [a.nbytes for a in jax.tree.leaves(params)]
  return sum(a.size for a in jax.tree.leaves(params)), max(sizes)


def child(code):
  """Runs python code in a child; returns (wall seconds, the child's peak RSS in bytes).

  The peak is the child's own VmHWM (per address space, reset at exec): ru_maxrss of children
  would inherit this parent's high-water mark through fork.
  """
  report = ("\nimport atexit\ndef _hwm():\n  for l in open('/proc/self/status'):\n"
            "    if l.startswith('VmHWM'): print('VMHWM', int(l.split()[1]) * 1024)\n"
            "atexit.register(_hwm)\n")
  start = time.time()
  r = subprocess.run([sys.executable, "-c", report + code], check=True, capture_output=True,
                     text=True)
  wall = time.time() - start
  return wall, int(r.stdout.split("VMHWM")[-1].split()[0])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--work_dir", default="/tmp/export_bench")
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  shutil.rmtree(args.work_dir, ignore_errors=True)
  model_dir, out = os.path.join(args.work_dir, "run"), os.path.join(args.work_dir, "hf")
  n_params, largest = build(model_dir)
  spm = os.path.join(os.path.dirname(__file__), "..", "openmoe_jax", "assets",
                     "stdlib_unigram_7892.model")
  _, base_rss = child(f"from openmoe_jax import checkpoint, export; "
                      f"checkpoint.ParamReader({model_dir!r}, 1).close()")
  wall, rss = child(f"import sys; from openmoe_jax import export; sys.exit(export.main(["
                    f"'--model_dir={model_dir}', '--output_dir={out}', '--dtype={args.dtype}', "
                    f"'--spm_path={spm}']))")
  written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                if f.endswith(".safetensors"))
  result = {"params": n_params, "dtype": args.dtype, "bytes_written": written,
            "wall_s": round(wall, 1), "MB_per_s": round(written / 2**20 / wall, 1),
            "peak_rss_MiB": round(rss / 2**20), "import_only_rss_MiB": round(base_rss / 2**20),
            "largest_tensor_MiB": round(largest / 2**20),
            "checkpoint_MiB": round(n_params * 4 / 2**20)}
  print(json.dumps(result, indent=1))
  shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
