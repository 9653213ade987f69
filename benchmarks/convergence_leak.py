"""What the convergence check (tests/test_convergence.py) sees when the causal mask leaks.

Trains tests/fixtures/convergence.gin (seed 7, the test's) in this process with the attention
mask widened by --ahead positions (a position also sees the next `ahead` inputs, the first of
which is the token it predicts), and prints the held-out loss as JSON next to the band the test
accepts. --ahead 0 is the unmodified model.

  .venv/bin/python benchmarks/convergence_leak.py --ahead 1
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ahead", type=int, default=1, help="future positions each position sees")
  a = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax.numpy as jnp
  from openmoe_jax.model import layers, transformer
  from openmoe_jax.commands import train

  def leaky_mask(segment_ids, token_mask):
    idx = jnp.arange(segment_ids.shape[-1])
    mask = (idx[:, None] + a.ahead >= idx[None, :])[None]
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask & token_mask[:, :, None] & token_mask[:, None, :]
    return mask[:, None]

  if a.ahead:
    layers.attention_mask = transformer.attention_mask = leaky_mask
  model_dir = os.path.join(tempfile.mkdtemp(prefix="convergence-leak-"), "run")
  code = train.main([f"--gin_file={ROOT / 'tests' / 'fixtures' / 'convergence.gin'}",
                     f"--gin.MODEL_DIR='{model_dir}'", "--gin.SEED=7"])
  if code:
    sys.exit(code)
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
  ev = [r for r in rows if "eval/loss" in r][-1]
  sys.path.insert(0, str(ROOT / "tests"))
  import test_convergence as t  # the band the test accepts
  print(json.dumps({"ahead": a.ahead, "eval_loss": ev["eval/loss"],
                    "band": [t.SEEDS_MIN - t.MARGIN, t.SEEDS_MAX + t.MARGIN],
                    "unigram": ev["eval/unigram_cross_entropy"]}))


if __name__ == "__main__":
  main()
