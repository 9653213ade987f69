"""The OpenMoE paper's routing analyses (paper §4, App. E-F) over checkpoints: the routing report
and its figures (the library behind `openmoe-analyze`; docs/routing_analysis.md).
"""
import functools
import os
import re
import sys

import numpy as np

from openmoe_jax import fs
from openmoe_jax.evaluation import routing_stats as analysis
from openmoe_jax.training import run_dir
from openmoe_jax.errors import UsageError
from openmoe_jax.model import routing
from openmoe_jax.model.transformer import Transformer
from openmoe_jax.model.moe import Router
from openmoe_jax.data import pipeline as data

REPORT = "routing_report.json"


@functools.lru_cache(maxsize=None)  # one compilation per (config, cf) across checkpoints and tasks
def make_routing_fn(cfg, capacity_factor: float):
  """jit fn(params, batch) -> (expert_index int32[M, B, L, K], kept bool[M, B, L, K]) over the M
  MoE layers, running the model with `capacity_factor` as its eval capacity factor.

  Under expert choice (cfg.router 'experts_choose', K = E) it returns two more arrays:
  top1 int32[M, B, L], each token's top-1 expert (the highest combine weight among the experts
  that took it, lowest index on a tie; -1 where none took it), and preferred int32[M, B, L], its
  highest-scoring expert (argmax of the router scores).

  The router logits are captured with flax `capture_intermediates` and routed again with the
  layer's own capacity rule, so model.py needs no analysis hooks.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  # remat would wrap the layers in a transform that capture_intermediates cannot see through.
  run_cfg = cfg.replace(eval_capacity_factor=capacity_factor, remat_policy="none")
  expert_choice = cfg.router == "experts_choose"

  def fn(params, batch):
    inputs = batch["decoder_input_tokens"]
    b, length = inputs.shape
    _, state = Transformer(run_cfg).apply(
        {"params": params}, inputs, batch["decoder_target_tokens"],
        batch.get("decoder_segment_ids"), batch.get("decoder_positions"), deterministic=True,
        capture_intermediates=lambda m, _: isinstance(m, Router), mutable=["intermediates"])
    flat = traverse_util.flatten_dict(state["intermediates"])
    flat_params = traverse_util.flatten_dict(params)
    # (layer, router logits, the layer's loss-free expert bias or None: it moves the choice)
    logits = sorted((int(re.search(r"layers_(\d+)", "/".join(k)).group(1)), v[0],
                     flat_params.get((*k[:-2], "expert_bias")))
                    for k, v in flat.items() if k[-2] == "router")
    capacity = group_settings(cfg, b, length, [capacity_factor])["expert_capacity"][
        str(capacity_factor)]
    # The layer pads [B, L] to a multiple of E x replicas before grouping (`group_layout`):
    # route the padded block, then cut back to the real [B, L] as the layer does.
    pad_rows, pad_cols, _, _ = routing.group_layout(cfg, b, length)
    unpad = lambda x: x.reshape(b + pad_rows, length + pad_cols, -1)[:b, :length]
    out = ([], [], [], [])
    for _, lg, bias in logits:
      r = routing.route(cfg, lg, capacity, seq_len=length + pad_cols, expert_bias=bias)
      out[0].append(unpad(r.expert_index))
      out[1].append(unpad(r.kept))
      if expert_choice:
        kept = unpad(r.kept)
        top1 = jnp.argmax(jnp.where(kept, unpad(r.combine_weights), -jnp.inf), axis=-1)
        out[2].append(jnp.where(kept.any(axis=-1), top1, -1).astype(jnp.int32))
        out[3].append(jnp.argmax(unpad(r.router_probs), axis=-1).astype(jnp.int32))
    return tuple(jnp.stack(x) for x in out if x)

  return jax.jit(fn)


def group_settings(cfg, batch_size: int, length: int, capacity_factors) -> dict:
  """Tokens per routing group and expert capacity per capacity factor, as the layer computes
  (under expert choice, an expert's capacity is the tokens it takes, at most the group's)."""
  _, _, groups, per_group = routing.group_layout(cfg, batch_size, length)
  caps = {str(cf): routing.group_capacity(cfg, per_group, cf) for cf in capacity_factors}
  if cfg.router == "experts_choose":
    caps = {cf: min(c, per_group) for cf, c in caps.items()}
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

  Under expert choice the counters are expert-choice ones (`routing_stats` module docstring).
  """
  fns = {cf: make_routing_fn(cfg, cf) for cf in dict.fromkeys([routing_cf, *capacity_factors])}
  expert_choice = cfg.router == "experts_choose"
  counters = None
  for batch in batches:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    real = batch["decoder_target_tokens"] > 0
    length = real.shape[1]
    positions = batch.get("decoder_positions", np.broadcast_to(np.arange(length), real.shape))
    if counters is None:
      counters = [analysis.RoutingCounters(cfg.vocab_size, cfg.num_experts, length, position_bins,
                                           expert_choice=expert_choice)
                  for _ in cfg.moe_layers]
    for cf, fn in fns.items():
      if expert_choice:
        _, kept, top1, preferred = (np.asarray(x) for x in fn(params, batch))
        for layer, c in enumerate(counters):
          if cf == routing_cf:
            c.add_expert_choices(batch["decoder_input_tokens"], positions, kept[layer],
                                 top1[layer], real)
          if cf in capacity_factors:
            c.add_expert_choice_drops(cf, kept[layer], preferred[layer], real)
        continue
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
  it = data.make_iterator(task, lengths, batch_size, split=split, seed=seed, num_epochs=1,
                          shard_index=0, num_shards=1)
  seen = 0
  for batch in it:
    if seen >= num_tokens:
      return
    seen += int((batch["decoder_target_tokens"] > 0).sum())
    yield batch


def _decoder(task):
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
      "router": cfg.router, "capacity_factors": capacity_factors,
      "routing_capacity_factor": routing_cf,
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
  # Each task's batches are read once and kept (num_tokens x 5 int32 features: 2 MB per 100k
  # tokens) for every checkpoint: half the input work, and one stream per task left unfinished
  # instead of one per checkpoint (tf.data can hang destroying a half-read iterator).
  streams = {task: list(_batches(task, lengths, batch_size, split, seed, num_tokens))
             for task in tasks}
  for step in steps:
    params, _ = run_dir.load_params(model_dir, step)
    per_task = {}
    for task in tasks:
      bar.set_description(f"step {step} {task}")
      per_task[task] = collect(cfg, params, streams[task], capacity_factors, routing_cf,
                               position_bins, bar.update)
      if per_task[task] is None:
        raise UsageError(f"task {task} gave no complete batch of {batch_size} rows")
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
  """PNG figures of `report` (matplotlib Agg); returns their file names. Under expert choice
  the same four figures, with the expert-choice meanings in their labels."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = report["settings"]
  expert_choice = s.get("router") == "experts_choose"
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
    ax.set(title=f"layer {l} (CV {', '.join(cvs)})", xlabel="expert",
           ylabel="share of picks" if expert_choice else "share of assignments")
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
      for key, style, what in (("by_position_bin", "o-", "no expert" if expert_choice else "all"),
                               ("first_choice_by_position_bin", "x--",
                                "not its best expert" if expert_choice else "1st choice")):
        curves = [last["tasks"][t]["layers"][l]["drops"][cf][key] for l in layers]
        mean = [np.mean([c[b] for c in curves if c[b] is not None] or [np.nan])
                for b in range(s["position_bins"])]
        ax.plot(100 * np.asarray(mean), style, label=f"{t} ({what})")
    ax.set(title=f"capacity factor {cf}", xlabel=f"position bin (of {s['position_bins']})",
           ylabel="tokens not taken (%)" if expert_choice else "dropped assignments (%)")
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
