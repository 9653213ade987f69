"""`openmoe-analyze`: the OpenMoE paper's routing analyses (paper §4, App. E-F) on any checkpoint.

    openmoe-analyze --model_dir=runs/quickstart --steps=100,200,300 \
        --mixture_or_task_name=builtin_corpus_full_lm,builtin_docstrings_full_lm \
        --num_tokens=100000 --output_dir=/tmp/analysis

Runs every checkpoint over the same N tokens of each task (eval mode, one forward pass per
capacity factor), records every MoE layer's router decisions in streaming counters and writes
O/routing_report.json plus PNG figures: expert load per task (+ coefficient of variation),
context-independent specialisation (token IDs vs position IDs vs uniform routing), drops by
position bin at each capacity factor, and top-1 agreement of every checkpoint with the last.
Load, specialisation and agreement use the routing at the model's eval capacity factor.
"""
import argparse
import functools
import json
import os
import re
import sys

import numpy as np

from openmoe_jax import analysis, cli, fs, gin_utils, run_dir

REPORT = "routing_report.json"


@functools.lru_cache(maxsize=None)  # one compilation per (config, cf) across checkpoints and tasks
def make_routing_fn(cfg, capacity_factor: float):
  """jit fn(params, batch) -> (expert_index int32[M, B, L, K], kept bool[M, B, L, K]) over the M
  MoE layers, running the model with `capacity_factor` as its eval capacity factor.

  The router logits are captured with flax `capture_intermediates` and routed again with the
  layer's own capacity rule, so model.py needs no analysis hooks.
  """
  import jax
  from flax import traverse_util
  from openmoe_jax import routing
  from openmoe_jax.model import Transformer
  from openmoe_jax.moe import Router
  # remat would wrap the layers in a transform that capture_intermediates cannot see through.
  run_cfg = cfg.replace(eval_capacity_factor=capacity_factor, remat_policy="none")

  def fn(params, batch):
    inputs = batch["decoder_input_tokens"]
    b, length = inputs.shape
    _, state = Transformer(run_cfg).apply(
        {"params": params}, inputs, batch["decoder_target_tokens"],
        batch.get("decoder_segment_ids"), batch.get("decoder_positions"), deterministic=True,
        capture_intermediates=lambda m, _: isinstance(m, Router), mutable=["intermediates"])
    flat = traverse_util.flatten_dict(state["intermediates"])
    logits = sorted((int(re.search(r"layers_(\d+)", "/".join(k)).group(1)), v[0])
                    for k, v in flat.items() if k[-2] == "router")
    capacity = group_settings(cfg, b, length, [capacity_factor])["expert_capacity"][
        str(capacity_factor)]
    index, kept = [], []
    for _, lg in logits:
      r = routing.route(cfg, lg, capacity)
      index.append(r.expert_index.reshape(b, length, -1))
      kept.append(r.kept.reshape(b, length, -1))
    return jax.numpy.stack(index), jax.numpy.stack(kept)

  return jax.jit(fn)


def group_settings(cfg, batch_size: int, length: int, capacity_factors) -> dict:
  """Tokens per routing group and expert capacity per capacity factor, as the layer computes."""
  from openmoe_jax import routing
  _, _, groups, per_group = routing.group_layout(cfg, batch_size, length)
  caps = {str(cf): routing.group_capacity(cfg, per_group, cf) for cf in capacity_factors}
  return {"num_groups": groups, "tokens_per_group": per_group, "expert_capacity": caps}


def collect(cfg, params, batches, capacity_factors, routing_cf, position_bins, progress=None):
  """Streams `batches` through the model; returns one RoutingCounters per MoE layer.

  Args:
    cfg: ModelConfig.
    params: model parameters.
    batches: iterable of dicts with decoder_* int arrays [B, L].
    capacity_factors: drops are recorded at each of these.
    routing_cf: capacity factor whose routing feeds load, specialisation and agreement.
    position_bins: bins of the drop-by-position counters.
    progress: optional callable(num_real_tokens) after each batch.
  """
  fns = {cf: make_routing_fn(cfg, cf) for cf in dict.fromkeys([routing_cf, *capacity_factors])}
  counters = None
  for batch in batches:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    real = batch["decoder_target_tokens"] > 0
    length = real.shape[1]
    positions = batch.get("decoder_positions", np.broadcast_to(np.arange(length), real.shape))
    if counters is None:
      counters = [analysis.RoutingCounters(cfg.vocab_size, cfg.num_experts, length, position_bins)
                  for _ in cfg.moe_layers]
    for cf, fn in fns.items():
      index, kept = (np.asarray(x) for x in fn(params, batch))
      for layer, c in enumerate(counters):
        if cf == routing_cf:
          c.add_choices(batch["decoder_input_tokens"], positions, index[layer], real)
        if cf in capacity_factors:
          c.add_drops(cf, kept[layer], real)
    if progress:
      progress(int(real.sum()))
  return counters


def _batches(task, lengths, batch_size, split, seed, num_tokens):
  """Up to `num_tokens` real tokens of `task`: the same stream for every checkpoint."""
  from openmoe_jax import data
  it = data.make_iterator(task, lengths, batch_size, split=split, seed=seed, num_epochs=1,
                          shard_index=0, num_shards=1)
  seen = 0
  for batch in it:
    if seen >= num_tokens:
      return
    seen += int((batch["decoder_target_tokens"] > 0).sum())
    yield batch


def _decoder(task):
  from openmoe_jax import data
  voc = data.get_provider(task).output_features["targets"].vocabulary
  piece = getattr(getattr(voc, "tokenizer", None), "id_to_piece", None)
  def decode(i):
    try:
      return piece(i) if piece and i < voc.tokenizer.get_piece_size() else voc.decode([i])
    except Exception:  # pylint: disable=broad-except  (sentinels / ids past the vocabulary)
      return None
  return decode


def analyze(cfg, model_dir, steps, tasks, lengths, batch_size, num_tokens, capacity_factors,
            split="train", seed=0, min_count=128, position_bins=16, top_tokens=10,
            progress_bar=True) -> dict:
  """The whole report (see module docstring) as a JSON-ready dict."""
  import tqdm
  length = sum(lengths.values())
  routing_cf = cfg.eval_capacity_factor
  decode = _decoder(tasks[0])
  report = {"settings": {
      "model_dir": fs.abspath(model_dir), "steps": steps, "tasks": tasks,
      "num_tokens_requested": num_tokens, "task_feature_lengths": lengths,
      "batch_size": batch_size, "split": split, "seed": seed,
      "capacity_factors": capacity_factors, "routing_capacity_factor": routing_cf,
      "train_capacity_factor": cfg.train_capacity_factor,
      "eval_capacity_factor": cfg.eval_capacity_factor, "capacity_formula": cfg.capacity_formula,
      "no_drop": cfg.no_drop, "capacity_mode": cfg.capacity_mode,
      "capacity_order": cfg.capacity_order, "num_experts": cfg.num_experts,
      "num_selected_experts": cfg.num_selected_experts, "moe_layers": list(cfg.moe_layers),
      "min_count": min_count, "position_bins": position_bins,
      **group_settings(cfg, batch_size, length, sorted({routing_cf, *capacity_factors}))},
      "checkpoints": {}}
  bar = tqdm.tqdm(total=num_tokens * len(steps) * len(tasks), unit="tok", disable=not progress_bar,
                  file=sys.stderr)
  token_counts = {}
  for step in steps:
    params, _ = run_dir.load_params(model_dir, step)
    per_task = {}
    for task in tasks:
      bar.set_description(f"step {step} {task}")
      per_task[task] = collect(cfg, params, _batches(task, lengths, batch_size, split, seed,
                                                     num_tokens),
                               capacity_factors, routing_cf, position_bins, bar.update)
      if per_task[task] is None:
        raise gin_utils.UsageError(f"task {task} gave no complete batch of {batch_size} rows")
    last = step == steps[-1]
    layers = [str(i) for i in cfg.moe_layers]
    entry = {"tasks": {t: {"layers": {l: analysis.summarise(c, min_count, decode, None)
                                      for l, c in zip(layers, cs)}} for t, cs in per_task.items()}}
    combined = [analysis.merge([per_task[t][i] for t in tasks]) for i in range(len(layers))]
    entry["all_tasks"] = {"layers": {l: analysis.summarise(c, min_count, decode,
                                                           top_tokens if last else None)
                                     for l, c in zip(layers, combined)}}
    for s in entry["all_tasks"]["layers"].values():
      s.pop("drops")  # drops are per task; a sum over tasks would mix their position profiles
    report["checkpoints"][str(step)] = entry
    token_counts[step] = [c.token_top1 for c in combined]
  bar.close()
  ref = steps[-1]
  report["early_routing"] = {"reference_step": ref, "min_count": min_count, "layers": {
      str(l): {str(s): analysis.top1_agreement(token_counts[s][i], token_counts[ref][i], min_count)
               for s in steps}
      for i, l in enumerate(cfg.moe_layers)}}
  return report


def write_figures(report: dict, output_dir: str) -> list:
  """PNG figures of `report` (matplotlib Agg); returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = report["settings"]
  steps, tasks, layers = s["steps"], s["tasks"], [str(l) for l in s["moe_layers"]]
  last = report["checkpoints"][str(steps[-1])]
  names = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=80)
    plt.close(fig)
    names.append(name)

  # 1. Expert load per layer and task.
  fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.2), squeeze=False)
  width = 0.8 / len(tasks)
  for ax, l in zip(axes[0], layers):
    cvs = []
    for j, t in enumerate(tasks):
      m = last["tasks"][t]["layers"][l]
      e = np.arange(len(m["expert_load"]))
      ax.bar(e + j * width, m["expert_load"], width, label=t)
      cvs.append(f"{m['expert_load_cv']:.2f}")
    ax.axhline(1 / s["num_experts"], color="k", lw=0.8, ls="--")
    ax.set(title=f"layer {l} (CV {', '.join(cvs)})", xlabel="expert", ylabel="share of assignments")
  axes[0][0].legend(fontsize=7)
  save(fig, "expert_load.png")

  # 2. Specialisation: token IDs vs position IDs vs uniform routing, per step.
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  for ax, key, label in ((axes[0], "top1_share", "top-1 share of most frequent expert"),
                         (axes[1], "routing_std", "std of routing distribution")):
    for l in layers:
      get = lambda kind, k, l=l: [report["checkpoints"][str(st)]["all_tasks"]["layers"][l][kind][k]
                                  for st in steps]
      ax.plot(steps, get("token_id_specialisation", key), "o-", label=f"L{l} token ID")
      ax.plot(steps, get("position_id_specialisation", key), "s--", label=f"L{l} position ID")
      ax.plot(steps, get("token_id_specialisation", "uniform_" + key), ":", label=f"L{l} uniform")
    ax.set(xlabel="checkpoint step", ylabel=label)
  axes[0].legend(fontsize=6)
  save(fig, "specialisation.png")

  # 3. Drops by position bin, mean over MoE layers, per capacity factor and task.
  cfs = [str(cf) for cf in s["capacity_factors"]]
  fig, axes = plt.subplots(1, len(cfs), figsize=(4.5 * len(cfs), 3.2), squeeze=False)
  for ax, cf in zip(axes[0], cfs):
    for t in tasks:
      for key, style, what in (("by_position_bin", "o-", "all"),
                               ("first_choice_by_position_bin", "x--", "1st choice")):
        curves = [last["tasks"][t]["layers"][l]["drops"][cf][key] for l in layers]
        mean = [np.mean([c[b] for c in curves if c[b] is not None] or [np.nan])
                for b in range(s["position_bins"])]
        ax.plot(100 * np.asarray(mean), style, label=f"{t} ({what})")
    ax.set(title=f"capacity factor {cf}", xlabel=f"position bin (of {s['position_bins']})",
           ylabel="dropped assignments (%)")
  axes[0][0].legend(fontsize=7)
  save(fig, "drops_by_position.png")

  # 4. Early routing learning: agreement with the last checkpoint.
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for l, per_step in report["early_routing"]["layers"].items():
    ax.plot(steps, [per_step[str(st)]["agreement"] for st in steps], "o-", label=f"layer {l}")
  ax.set(xlabel="checkpoint step", ylabel=f"top-1 agreement with step {steps[-1]}", ylim=(0, 1.05))
  ax.legend(fontsize=7)
  save(fig, "early_routing.png")
  return names


def build_parser():
  parser = argparse.ArgumentParser(prog="openmoe-analyze", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  a = parser.add_argument
  a("--steps", help="comma-separated checkpoint steps, the last one is the reference for early "
                    "routing agreement (default: every checkpoint in MODEL_DIR)")
  a("--mixture_or_task_name", help="comma-separated tasks or mixtures to analyse "
                                   "(default: the one the run trained on)")
  a("--num_tokens", type=int, default=100_000,
    help="real tokens per task and checkpoint (default 100000); fewer if the split runs out")
  a("--task_feature_lengths", help="JSON, e.g. '{\"targets\": 128}' (default: the run's)")
  a("--seq_len", type=int, help="shorthand for --task_feature_lengths='{\"targets\": SEQ_LEN}'")
  a("--batch_size", type=int, help="rows per forward pass; sets the routing group size and so "
                                   "the capacity (default: the run's BATCH_SIZE, else 8)")
  a("--capacity_factors", help="comma-separated capacity factors at which to measure drops "
                               "(default: the model's train and eval capacity factors)")
  a("--split", default="train", help="dataset split (default train)")
  a("--seed", type=int, default=0, help="data shuffling seed (default 0)")
  a("--min_count", type=int, default=128,
    help="occurrences a token or position ID needs to count in specialisation (default 128)")
  a("--position_bins", type=int, default=16,
    help="bins of the drop-by-position curves (default 16)")
  a("--top_tokens", type=int, default=10, help="top token IDs listed per expert (default 10)")
  a("--output_dir", required=True, help="where routing_report.json and the figures go")
  cli.add_model_dir_flags(parser, step=False)
  a("--no_progress", action="store_true", help="hide the progress bar")
  return parser


def _run_batch_size(model_dir):
  path = fs.join(model_dir, "config.gin")
  if fs.exists(path):
    m = re.search(r"^BATCH_SIZE = (\d+)", fs.read_text(path), re.M)
    if m:
      return int(m.group(1))
  return 8


def main(argv=None):
  cli.start_command(argv)
  try:
    args, overrides = cli.parse_tool_args(build_parser(), argv)
  except gin_utils.UsageError as e:
    print(f"openmoe-analyze: error: {gin_utils.error_line(e)}", file=sys.stderr)
    return 2
  out = os.path.join(args.output_dir, REPORT)
  tmp = out + ".tmp"
  try:
    cfg = run_dir.load_model_config(args.model_dir, overrides)
    if not cfg.moe_layers:
      raise gin_utils.UsageError("the model has no MoE layer: nothing to analyse")
    from openmoe_jax import checkpoint
    have = checkpoint.list_steps(args.model_dir)
    if args.steps and not re.fullmatch(r"\d+(,\d+)*", args.steps):
      raise gin_utils.UsageError(f"--steps must be comma-separated integers, got {args.steps!r}")
    steps = [int(x) for x in args.steps.split(",")] if args.steps else have
    missing = [s for s in steps if s not in have]
    if not steps or missing:
      raise gin_utils.UsageError(f"no checkpoint for steps {missing or steps} in "
                                 f"{args.model_dir} (have {have})")
    import tasks  # noqa: F401  registers tasks (slow: TensorFlow), so after the cheap checks
    from openmoe_jax import data
    info = run_dir.run_info(args.model_dir)
    names = (args.mixture_or_task_name or info.get("mixture_or_task_name") or "").split(",")
    names = [n for n in names if n]
    if not names:
      raise gin_utils.UsageError("pass --mixture_or_task_name")
    for n in names:
      try:
        data.get_provider(n)
      except ValueError:
        raise gin_utils.UsageError(f"unknown task or mixture {n!r}") from None
    if args.seq_len:
      lengths = {"targets": args.seq_len}
    elif args.task_feature_lengths:
      try:
        lengths = {str(k): int(v) for k, v in json.loads(args.task_feature_lengths).items()}
      except (ValueError, AttributeError):
        raise gin_utils.UsageError("--task_feature_lengths must be a JSON object of ints") from None
    else:
      lengths = info.get("task_feature_lengths") or {"targets": 128}
    cfs = ([float(x) for x in args.capacity_factors.split(",") if x] if args.capacity_factors
           else [cfg.train_capacity_factor, cfg.eval_capacity_factor])
    batch_size = args.batch_size or _run_batch_size(args.model_dir)
    for flag, value in (("--num_tokens", args.num_tokens), ("--batch_size", batch_size),
                        ("--position_bins", args.position_bins)):
      if value < 1:
        raise gin_utils.UsageError(f"{flag}={value}: must be a positive integer")
    if not cfs or min(cfs) <= 0:
      raise gin_utils.UsageError(f"--capacity_factors={args.capacity_factors}: must be positive "
                                 "numbers, comma-separated")
    group_settings(cfg, batch_size, sum(lengths.values()), cfs)  # fails early on a bad shape
    os.makedirs(args.output_dir, exist_ok=True)
    report = analyze(cfg, args.model_dir, sorted(steps), names, lengths, batch_size,
                     args.num_tokens, sorted(set(cfs)), split=args.split, seed=args.seed,
                     min_count=args.min_count, position_bins=args.position_bins,
                     top_tokens=args.top_tokens, progress_bar=not args.no_progress)
    report["settings"]["model_overrides"] = overrides
    report["figures"] = write_figures(report, args.output_dir)
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, out)
  except (gin_utils.UsageError, ValueError) as e:
    msg = str(e).splitlines()[0] if str(e) else repr(e)
    print(f"openmoe-analyze: error: {msg}", file=sys.stderr)
    return 2
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(f"analysed steps {report['settings']['steps']} on {', '.join(names)} -> {out}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
