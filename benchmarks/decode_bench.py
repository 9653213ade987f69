"""Decode tokens/s on CPU: openmoe_jax's cached decoding vs the exported model's PyTorch generate.

    .venv/bin/python benchmarks/decode_bench.py [--model_dir=runs/quickstart] [--new_tokens=64]

The model is the quick start's (`gin/models/small.gin`: d 512, 4 layers, 2 MoE layers of 8
experts, 8192-id vocabulary) with random parameters, or a trained MODEL_DIR. Both sides decode
greedily from the same prompts (BOS + 16 tokens) for --new_tokens tokens with no-drop routing
(no EOS stop), batch 1 and batch 8, in float32; the JAX side is compiled first (one warm-up run)
and both report the median of --repeats runs. Greedy tokens are compared too. Prints JSON.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _random_run(model_dir: str):
  import jax
  import jax.numpy as jnp
  from openmoe_jax import gin_utils
  from openmoe_jax.training import checkpoint as ckpt_lib
  from openmoe_jax.model import partitioning
  from openmoe_jax.model.transformer import Transformer
  gin_utils.parse_gin(["models/small.gin"], [])
  cfg = gin_utils.model_config()
  params = partitioning.unbox(Transformer(cfg).init(jax.random.key(0),
                                                    jnp.ones((1, 16), jnp.int32))["params"])
  os.makedirs(model_dir)
  with open(os.path.join(model_dir, "model_config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f)
  with open(os.path.join(model_dir, "run.json"), "w") as f:
    json.dump({"mixture_or_task_name": "builtin_mix_full_lm"}, f)
  with ckpt_lib.Checkpointer(model_dir, async_save=False) as c:
    c.save(1, {"step": np.int32(1), "params": params, "opt_state": {}}, {}, force=True)


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", help="a trained MODEL_DIR (default: random small.gin)")
  parser.add_argument("--new_tokens", type=int, default=64, help="tokens decoded per prompt")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
  args = parser.parse_args(argv)
  import jax
  import torch
  from openmoe_jax.training import checkpoint
  from openmoe_jax.evaluation import decoding
  from openmoe_jax.interop import hf_export as export
  from openmoe_jax.training import run_dir
  work = tempfile.mkdtemp(prefix="decode_bench-")
  model_dir = args.model_dir or os.path.join(work, "run")
  if not args.model_dir:
    _random_run(model_dir)
  cfg = run_dir.load_model_config(model_dir, ["no_drop=true"])
  params = decoding.place_params(checkpoint.restore_params(model_dir), cfg)
  hf_dir = os.path.join(work, "hf")
  export.export(model_dir, hf_dir)
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                               dtype=torch.float32, router_no_drop=True).eval()
  rng = np.random.default_rng(0)
  results = []
  for batch in (1, 8):
    prompts = [list(rng.integers(3, 7892, 16)) for _ in range(batch)]
    run_jax = lambda: decoding.generate(params, cfg, prompts, max_new_tokens=args.new_tokens,
                                        eos_id=-1)
    run_jax()  # compile
    jax_s, jax_out = _median_time(run_jax, args.repeats)
    ids = torch.tensor([[0] + p for p in prompts])
    def run_torch():
      with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0)
    run_torch()
    torch_s, torch_out = _median_time(run_torch, args.repeats)
    same = [g.ids for g in jax_out] == torch_out[:, 17:].tolist()
    tokens = batch * args.new_tokens
    results.append({"batch": batch, "new_tokens": args.new_tokens,
                    "jax_tokens_per_s": round(tokens / jax_s, 1),
                    "torch_tokens_per_s": round(tokens / torch_s, 1),
                    "speedup": round(torch_s / jax_s, 2), "same_greedy_tokens": same})
  print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "model": {k: getattr(cfg, k) for k in ("emb_dim", "num_layers", "num_experts",
                                                          "vocab_size")},
                    "results": results}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
