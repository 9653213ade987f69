"""Which routing design fixes which of OpenMoE's routing problems: a measured study.

OpenMoE (Xue et al. 2024, arXiv:2402.01739, section 4) found three problems in its routers:
context-independent specialisation (experts chosen by token ID), early routing learning (the
routing fixed early in training) and drop-towards-the-end (late positions of a sequence
dropped first). This script trains the same small model under each design at **equal active
expert parameters per token and equal training tokens**, for several seeds, one run after the
other, and measures for each:

  * held-out loss (the run's own evaluation at the last step, `data.EVAL_SEED`'s examples);
  * held-out loss on the last quarter of positions against the first quarter (drops towards
    the end would hurt the last quarter);
  * dropped assignments by position: in training (the run's `moe/dropped_by_position` over the
    last 20 steps, at the training capacity factor) and at evaluation (openmoe-analyze at the
    eval capacity factor);
  * token-ID specialisation: the top-1 share of token IDs (openmoe-analyze; a uniform router
    scores `uniform_top1_share`);
  * early routing learning: top-1 agreement of the checkpoint at --early_step with the last;
  * expert-load coefficient of variation (openmoe-analyze, last checkpoint);
  * median seconds per training step on this machine.

  .venv/bin/python benchmarks/routing_study.py --out_dir=/tmp/routing_study > study.json

Designs (`--designs`, all by default), gin/routing/ files over one base model (4 layers, 2 MoE
layers, d 128; OpenMoE's 8 experts of width 256, top-2: active expert width 512):
  openmoe           OpenMoE: softmax top-2, capacity factor 1.25, OpenMoE's queue order
  openmoe_dropless  the same, nothing dropped (routing/openmoe_dropless.gin)
  mixtral           softmax over the 2 selected logits, dropless (routing/mixtral.gin)
  olmoe             32 experts of width 64, top-8, dropless, aux + z (routing/olmoe.gin)
  deepseek          32 routed of width 64, top-7 in 2 of 4 groups, + 1 shared expert of width
                    64 (7 x 64 + 64 = 512 active), sigmoid, loss-free bias, sequence loss only
                    (routing/deepseek_v3.gin with the groups sized for 32 experts)
  expert_choice     each expert its top C = 2T/E tokens: 2 experts per token on average
                    (routing/expert_choice.gin)
Every design has the same expert parameters in total (8 x 256 = 32 x 64 per layer; the
DeepSeek design's shared expert adds one narrow expert's worth).

Takes about 40 minutes for 6 designs x 2 seeds on the 2-core CPU machine (benchmarks/RESULTS.md
"Routing study"); --train_steps and --seeds trade time for certainty. Progress goes to stderr,
the JSON to stdout.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BASE = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.EMBED_DIM=128", "--gin.NUM_HEADS=4", "--gin.HEAD_DIM=32", "--gin.MLP_DIM=256",
        "--gin.NUM_DECODER_LAYERS=4", "--gin.NUM_DECODER_SPARSE_LAYERS=2", "--gin.NUM_EXPERTS=8",
        "--gin.NUM_EMBEDDINGS=8192", "--gin.GROUP_SIZE=256",
        "--gin.MIXTURE_OR_TASK_NAME='builtin_mix_full_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.BATCH_SIZE=16",
        "--gin.EVAL_STEPS=10", "--gin.OPTIMIZER='adamw'", "--gin.train.progress_bar=False",
        "--gin.train.log_period=1"]
FINE = ["--gin.NUM_EXPERTS=32", "--gin.EXPERT_MLP_DIM=64"]
DESIGNS = {
    "openmoe": [],
    "openmoe_dropless": ["--gin_file=routing/openmoe_dropless.gin"],
    "mixtral": ["--gin_file=routing/mixtral.gin"],
    "olmoe": ["--gin_file=routing/olmoe.gin", *FINE],
    "deepseek": ["--gin_file=routing/deepseek_v3.gin", *FINE, "--gin.NUM_SELECTED_EXPERTS=7",
                 "--gin.NUM_EXPERT_GROUPS=4", "--gin.TOPK_GROUPS=2"],
    "expert_choice": ["--gin_file=routing/expert_choice.gin"],
}


def say(*a):
  print(*a, file=sys.stderr, flush=True)


def _bin(name):
  return os.path.join(os.path.dirname(sys.executable), name)


def _rows(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip().endswith("}")]


def train(design, seed, args):
  model_dir = os.path.join(args.out_dir, f"{design}-seed{seed}")
  steps = args.train_steps
  opt = {"base_learning_rate": 3e-3, "warmup_steps": max(steps // 10, 1), "decay_steps": steps,
         "weight_decay": 0.01, "grad_clip_norm": 1.0}
  cmd = [_bin("openmoe-train"), *BASE, *DESIGNS[design], f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.TRAIN_STEPS={steps}", f"--gin.CHECKPOINT_PERIOD={args.early_step}",
         f"--gin.EVAL_PERIOD={steps}", f"--gin.train.seed={seed}",
         f"--gin.OPTIMIZER_KWARGS={opt!r}"]
  if not os.path.exists(os.path.join(model_dir, "checkpoints", str(steps))):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
      raise SystemExit(f"{design} seed {seed}: openmoe-train failed:\n{r.stderr[-3000:]}")
    say(f"  trained {design} seed {seed} in {time.time() - t:.0f} s")
  return model_dir


def analyze(model_dir, args):
  out = os.path.join(model_dir, "analysis")
  report = os.path.join(out, "routing_report.json")
  if not os.path.exists(report):
    cmd = [_bin("openmoe-analyze"), f"--model_dir={model_dir}", f"--output_dir={out}",
           f"--steps={args.early_step},{args.train_steps}", f"--num_tokens={args.num_tokens}",
           "--mixture_or_task_name=builtin_mix_full_lm", "--no_progress", "--min_count=32"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
      raise SystemExit(f"openmoe-analyze {model_dir} failed:\n{r.stderr[-3000:]}")
  with open(report) as f:
    return json.load(f)


def position_losses(model_dir, eval_batches):
  """Held-out loss over all positions and over the first and last quarter of each sequence's
  positions (packed examples: the position within the example), eval routing."""
  import jax
  import numpy as np
  import tasks  # noqa: F401  (registers the built-in tasks and mixtures)
  from openmoe_jax.data import pipeline as data_lib
  from openmoe_jax.training import run_dir, steps
  cfg = run_dir.load_model_config(model_dir)
  info = run_dir.run_info(model_dir)
  params, _ = run_dir.load_params(model_dir)
  length = info["task_feature_lengths"]["targets"]
  fn = jax.jit(lambda p, b: steps.token_log_probs(p, b, cfg=cfg))
  it = data_lib.make_iterator(info["mixture_or_task_name"], info["task_feature_lengths"], 16,
                              split="validation", shuffle=False, num_epochs=1,
                              seed=data_lib.EVAL_SEED)
  sums = {"all": [0.0, 0.0], "first_quarter": [0.0, 0.0], "last_quarter": [0.0, 0.0]}
  for _, batch in zip(range(eval_batches), it):
    nll = -np.asarray(fn(params, {k: jax.numpy.asarray(v) for k, v in batch.items()}))
    w = np.asarray(batch["decoder_loss_weights"], np.float64)
    pos = np.asarray(batch.get("decoder_positions", np.broadcast_to(np.arange(length), w.shape)))
    for key, sel in (("all", np.ones_like(w, bool)), ("first_quarter", pos < length // 4),
                     ("last_quarter", pos >= length - length // 4)):
      sums[key][0] += float((nll * w * sel).sum())
      sums[key][1] += float((w * sel).sum())
  return {k: s / max(n, 1.0) for k, (s, n) in sums.items()}


def measure(design, seed, args):
  model_dir = train(design, seed, args)
  rows = _rows(os.path.join(model_dir, "metrics.jsonl"))
  final = [r for r in rows if "eval/loss" in r][-1]
  train_rows = [r for r in rows if "loss" in r]
  tail = [r for r in train_rows if r["step"] > args.train_steps - 20]
  secs = [r["perf/seconds_per_step"] for r in train_rows if "perf/seconds_per_step" in r]
  report = analyze(model_dir, args)
  last = report["checkpoints"][str(args.train_steps)]["all_tasks"]["layers"]
  task = next(iter(report["checkpoints"][str(args.train_steps)]["tasks"].values()))["layers"]
  cf = str(report["settings"]["eval_capacity_factor"])
  layers = sorted(last)
  early = report["early_routing"]["layers"]
  losses = position_losses(model_dir, args.eval_batches)
  def mean(xs):
    xs = [x for x in xs if x is not None]  # a statistic without enough occurrences is None
    return float(statistics.fmean(xs)) if xs else None
  out = {
      "heldout_loss": final["eval/loss"],
      "heldout_loss_first_quarter": losses["first_quarter"],
      "heldout_loss_last_quarter": losses["last_quarter"],
      "last_minus_first_quarter": losses["last_quarter"] - losses["first_quarter"],
      "train_dropped_fraction": mean([r.get("moe/dropped_fraction", 0.0) for r in tail]),
      "train_dropped_by_position": [mean(col) for col in zip(
          *[r.get("moe/dropped_by_position", [0.0]) for r in tail])],
      "eval_dropped_by_position_bin": [mean(col) for col in zip(
          *[task[l]["drops"][cf]["by_position_bin"] for l in layers])],
      "token_id_top1_share": mean([last[l]["token_id_specialisation"]["top1_share"]
                                   for l in layers]),
      "uniform_top1_share": mean([last[l]["token_id_specialisation"]["uniform_top1_share"]
                                  for l in layers]),
      "position_id_top1_share": mean([last[l]["position_id_specialisation"]["top1_share"]
                                      for l in layers]),
      "early_routing_agreement": mean([early[l][str(args.early_step)]["agreement"]
                                       for l in early]),
      "expert_load_cv": mean([last[l]["expert_load_cv"] for l in layers]),
      "seconds_per_step": statistics.median(secs) if secs else None,
  }
  if "moe/expert_bias_abs_max" in train_rows[-1]:
    out["expert_bias_abs_max"] = train_rows[-1]["moe/expert_bias_abs_max"]
  return out


COLUMNS = [("heldout_loss", "held-out loss", 3), ("last_minus_first_quarter",
            "last - first quarter", 3), ("train_dropped_fraction", "dropped (train)", 3),
           ("token_id_top1_share", "token-ID top-1 share", 2),
           ("uniform_top1_share", "uniform top-1", 2),
           ("early_routing_agreement", "agreement early/last", 2),
           ("expert_load_cv", "load CV", 2), ("seconds_per_step", "s / step", 2)]


def markdown(study: dict) -> str:
  """The study's table: mean over seeds, (min-max) where the seeds differ; and each design's
  held-out loss minus OpenMoE's with the same seed (the seeds move every design together)."""
  results = study["results"]
  head = ("| design | " + " | ".join(c[1] for c in COLUMNS)
          + " | dropped, first / last eighth of positions (train) | loss - OpenMoE's, per seed |")
  lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
  base = results.get("openmoe", {}).get("per_seed", {})
  for design, r in results.items():
    cells = []
    for key, _, digits in COLUMNS:
      s = r["summary"].get(key)
      if s is None:
        cells.append("-")
        continue
      cell = f"{s['mean']:.{digits}f}"
      if round(s["min"], digits) != round(s["max"], digits):
        cell += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
      cells.append(cell)
    by_pos = [r["per_seed"][k]["train_dropped_by_position"] for k in r["per_seed"]]
    first, last = (statistics.fmean(p[i] for p in by_pos) for i in (0, -1))
    deltas = [f"{r['per_seed'][k]['heldout_loss'] - base[k]['heldout_loss']:+.3f}"
              for k in r["per_seed"] if k in base]
    lines.append(f"| {design} | " + " | ".join(cells) + f" | {first:.3f} / {last:.3f} | "
                 f"{' / '.join(deltas) or '-'} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="/tmp/routing_study",
                      help="one MODEL_DIR per design and seed; finished runs and analyses are "
                           "reused (default /tmp/routing_study)")
  parser.add_argument("--designs", default=",".join(DESIGNS),
                      help=f"comma-separated, from {', '.join(DESIGNS)} (default: all)")
  parser.add_argument("--seeds", default="0,1", help="comma-separated train.seed values (0,1)")
  parser.add_argument("--train_steps", type=int, default=150, help="steps per run (150)")
  parser.add_argument("--early_step", type=int, default=50,
                      help="the early checkpoint compared with the last (50)")
  parser.add_argument("--num_tokens", type=int, default=20000,
                      help="tokens per checkpoint openmoe-analyze reads (20000)")
  parser.add_argument("--eval_batches", type=int, default=10,
                      help="held-out batches of 16 for the position-quarter losses (10)")
  parser.add_argument("--markdown", metavar="STUDY_JSON",
                      help="print the table of a finished study's JSON and exit")
  args = parser.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown(json.load(f)))
    return
  designs = args.designs.split(",")
  unknown = [d for d in designs if d not in DESIGNS]
  if unknown:
    parser.error(f"unknown design(s) {', '.join(unknown)}; choose from {', '.join(DESIGNS)}")
  if args.train_steps % args.early_step:
    parser.error("--train_steps must be a multiple of --early_step (checkpoint period)")
  os.makedirs(args.out_dir, exist_ok=True)
  started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
  results = {}
  for design in designs:
    per_seed = {}
    for seed in (int(s) for s in args.seeds.split(",")):
      per_seed[seed] = measure(design, seed, args)
    keys = [k for k, v in per_seed[min(per_seed)].items() if isinstance(v, (int, float))]
    summary = {}
    for k in keys:
      vals = [r[k] for r in per_seed.values() if r.get(k) is not None]
      summary[k] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
    results[design] = {"per_seed": per_seed, "summary": summary}
    say(f"{design}: held-out loss {summary['heldout_loss']['mean']:.3f} "
        f"({summary['heldout_loss']['min']:.3f}-{summary['heldout_loss']['max']:.3f})")
  print(json.dumps({
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "started": started,
      "minutes": round((time.time() - t0) / 60, 1), "load_average": os.getloadavg(),
      "settings": vars(args), "base": BASE, "designs": {d: DESIGNS[d] for d in designs},
      "results": results}, indent=1))
  say(markdown({"results": results}))


if __name__ == "__main__":
  main()
