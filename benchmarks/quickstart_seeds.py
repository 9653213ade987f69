"""The quick start's spread over seeds: held-out loss at every eval step for several `train.seed`.

Runs `openmoe-train --gin_file=quickstart.gin` once per seed (each in its own MODEL_DIR under
--out_dir, one after the other) with the given extra `--gin.` bindings, and prints one JSON
object: per seed the eval rows of its metrics.jsonl (loss, token accuracy, the unigram baseline)
and the train rows' largest grad_norm and loss; per eval step the mean, min and max over seeds.

--stop_at trains only the first N steps of the same schedule (DECAY_STEPS stays at
--train_steps, quickstart.gin's macro), so the early part of a recipe can be compared quickly:

  .venv/bin/python benchmarks/quickstart_seeds.py --seeds 0,1,2 --stop_at 100
  .venv/bin/python benchmarks/quickstart_seeds.py --seeds 0,1,2 \\
      --gin "OPTIMIZER_KWARGS={'base_learning_rate': 1e-3, 'warmup_steps': 30, 'decay_steps': 300}"

--gin_file runs another configuration the same way (the CI convergence check's band comes from
  .venv/bin/python benchmarks/quickstart_seeds.py --gin_file=$PWD/tests/fixtures/convergence.gin \\
      --seeds 0,1,2,3,4,7).

The seed picks both the initial parameters and the shuffle of the training stream.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _rows(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def run_seed(seed, out_dir, gin, stop_at, train_steps, gin_files=("quickstart.gin",)):
  model_dir = os.path.join(out_dir, f"seed{seed}")
  cmd = [os.path.join(os.path.dirname(sys.executable), "openmoe-train"),
         *[f"--gin_file={f}" for f in gin_files], f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.SEED={seed}", "--gin.train.progress_bar=False"]
  if stop_at:
    # The quick start's decay spans TRAIN_STEPS: keep it at the full run's length, stop early.
    cmd += [f"--gin.TRAIN_STEPS={stop_at}", f"--gin.DECAY_STEPS={train_steps}"]
  cmd += [f"--gin.{g}" for g in gin]
  t0 = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode != 0:
    return {"seed": seed, "error": (r.stderr.strip().splitlines() or ["?"])[-1],
            "seconds": round(time.time() - t0, 1)}
  rows = _rows(os.path.join(model_dir, "metrics.jsonl"))
  evals = {int(r["step"]): {k: r[k] for k in ("eval/loss", "eval/token_accuracy",
                                              "eval/unigram_cross_entropy") if k in r}
           for r in rows if "eval/loss" in r}
  train = [r for r in rows if "loss" in r]
  return {"seed": seed, "eval": evals, "seconds": round(time.time() - t0, 1),
          "max_grad_norm": max(r["grad_norm"] for r in train),
          "max_train_loss_after_50": max((r["loss"] for r in train if r["step"] > 50),
                                         default=None)}


def summarize(results):
  steps = sorted({s for r in results if "eval" in r for s in r["eval"]})
  out = {}
  for s in steps:
    losses = [r["eval"][s]["eval/loss"] for r in results if s in r.get("eval", {})]
    out[s] = {"mean": statistics.fmean(losses), "min": min(losses), "max": max(losses),
              "n": len(losses)}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
  p.add_argument("--gin_file", action="append", default=[],
                 help="the run's gin file (repeatable; default: quickstart.gin)")
  p.add_argument("--gin", action="append", default=[],
                 help="extra binding NAME=VALUE passed as --gin.NAME=VALUE (repeatable)")
  p.add_argument("--stop_at", type=int, default=0,
                 help="train only this many steps of the TRAIN_STEPS schedule (0: all)")
  p.add_argument("--train_steps", type=int, default=300,
                 help="the schedule's length when --stop_at is set (the quick start's 300)")
  p.add_argument("--out_dir", default="", help="where the runs go (default: a new temp dir)")
  a = p.parse_args(argv)
  out_dir = a.out_dir or tempfile.mkdtemp(prefix="quickstart-seeds-")
  gin_files = a.gin_file or ["quickstart.gin"]
  results = [run_seed(int(s), out_dir, a.gin, a.stop_at, a.train_steps, gin_files)
             for s in a.seeds.split(",")]
  print(json.dumps({
      "machine": f"{platform.node()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
      "load_1min": os.getloadavg()[0], "gin_file": gin_files, "gin": a.gin, "stop_at": a.stop_at, "out_dir": out_dir,
      "per_seed": results, "eval_loss_by_step": summarize(results)}, indent=1))


if __name__ == "__main__":
  main()
