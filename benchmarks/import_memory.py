"""openmoe-import of a many-shard Mixtral folder: peak resident memory against what it holds.

    .venv/bin/python benchmarks/import_memory.py [--work_dir=/tmp/import_memory] [--shard_mb=20]

Builds a Mixtral with transformers' own classes (random weights; d 512, 8 layers of 8 experts
of width 1024, vocab 32000: ~0.14B parameters, 533 MiB in float32), saved with
`save_pretrained(max_shard_size=...)` into many safetensors shards, then runs `openmoe-import`
in a child process and prints one JSON object: wall time, the child's peak RSS (ru_maxrss),
the RSS of a child that only imports the same libraries (the fixed cost), the peak of a child
that only reads the tensors into the parameter tree (no checkpoint written), the parameters'
bytes (the output the import holds until it is written) and the largest tensor and layer.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HF = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
          num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
          num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
_CHILD = """
import resource, sys, time
t = time.time()
from openmoe_jax.interop import hf_import
if sys.argv[1] == "import":
  hf_import.import_checkpoint(sys.argv[2], sys.argv[3])
if sys.argv[1] == "read":  # the reading half alone: config, then every tensor into the tree
  hf = hf_import.read_hf_config(sys.argv[2])
  cfg = hf_import.model_config(hf, (), (), "float32")
  hf_import.load_params(sys.argv[2], cfg, "mixtral")
print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def build(hf_dir, shard_mb):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.AutoConfig.for_model("mixtral", **HF)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  model.save_pretrained(hf_dir, max_shard_size=f"{shard_mb}MB")
  sizes = {k: v.numel() * 4 for k, v in model.state_dict().items()}
  per_layer = {}
  for k, n in sizes.items():
    if ".layers." in k:
      i = int(k.split(".layers.")[1].split(".")[0])
      per_layer[i] = per_layer.get(i, 0) + n
  return sum(sizes.values()), max(sizes.values()), max(per_layer.values())


def child(*args):
  r = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                     check=True)
  seconds, maxrss_kib = r.stdout.split()
  return float(seconds), int(maxrss_kib) * 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work_dir", default="/tmp/import_memory")
  parser.add_argument("--shard_mb", type=int, default=20, help="safetensors shard size")
  args = parser.parse_args()
  shutil.rmtree(args.work_dir, ignore_errors=True)
  os.makedirs(args.work_dir)
  hf_dir, run = os.path.join(args.work_dir, "hf"), os.path.join(args.work_dir, "run")
  total, largest, layer = build(hf_dir, args.shard_mb)
  shards = len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")])
  _, libs = child("libs")
  _, read_peak = child("read", hf_dir)
  seconds, peak = child("import", hf_dir, run)
  mib = lambda b: round(b / 2**20, 1)
  print(json.dumps({
      "date": time.strftime("%Y-%m-%d %H:%M"), "machine": os.uname().nodename,
      "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "shards": shards,
      "params_mib": mib(total), "largest_tensor_mib": mib(largest),
      "largest_layer_mib": mib(layer), "libraries_only_peak_rss_mib": mib(libs),
      "read_only_peak_rss_mib": mib(read_peak),
      "read_above_libraries_minus_params_mib": mib(read_peak - libs - total),
      "import_peak_rss_mib": mib(peak), "above_libraries_mib": mib(peak - libs),
      "above_libraries_minus_params_mib": mib(peak - libs - total),
      "import_seconds": round(seconds, 1)}, indent=1))


if __name__ == "__main__":
  main()
