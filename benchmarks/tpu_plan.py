"""TPU plans of OpenMoE's recipes (and variants) with XLA:TPU from libtpu, one JSON line each.

    python benchmarks/tpu_plan.py --case "8b_stage1 v3-256" --case "8b_stage1 v3-256 NUM_MICROBATCHES=16"
    python benchmarks/tpu_plan.py --case "8b_stage1 v5p-256 NUM_MODEL_PARTITIONS=4" --out plans.jsonl
    python benchmarks/tpu_plan.py --table plans.jsonl      # the markdown table of RESULTS.md
    python benchmarks/tpu_plan.py --case mixtral_v5p128_probe2 --case mixtral_v5p128_probe4 \
        --out mixtral.jsonl                                # two depths of a named case (NAMED)
    python benchmarks/tpu_plan.py --extrapolate mixtral.jsonl   # ... to the model's own depth

A case is "<recipe gin in gin/openmoe/ or any gin> <slice> [MACRO=value ...]": the run's step
exactly as `openmoe-train --gin_file=openmoe/<recipe>.gin --compile_only --tpu=<slice>` plans
it (same code path), with the macros overridden. Several gins join with "+" (a model gin and a
run gin: "models/mixtral_8x7b.gin+runs/pretrain.gin", as repeated --gin_file flags); a macro
with "." in its name is any gin binding (the FSDP override
"openmoe_jax.partitioning.axis_rules.overrides=[('embed','data')]"); no spaces inside one. A
name in NAMED stands for its case. Each big compile takes minutes and ~13 GB of host memory:
run one at a time. Every time and MFU printed is a compiler estimate.

Whole-depth extrapolation (`--extrapolate`): the layers are not scanned, so a model's full depth
compiles slowly; instead compile the same case at two depths (`NUM_DECODER_LAYERS=a` and `=b`,
every layer alike) and take each quantity as linear in the layer count: per layer =
(value(b) - value(a)) / (b - a), fixed part = value(a) - a x per layer, whole model = fixed part
+ L x per layer (L: the model gin's own NUM_DECODER_LAYERS). That is done for the argument,
temporary and peak bytes, the estimated step seconds (itself update + microbatches x (step -
update)), XLA's flops and bytes, the collectives and the model FLOPs of the MFU.
"""
import argparse
import json
import sys
import time

import cases  # benchmarks/cases.py, beside this script (its folder is on sys.path)

KEYS = ("accelerator_type", "num_devices", "mesh", "batch_size", "num_microbatches", "seq_len",
        "remat_policy", "dispatch", "capacity_mode", "grouped_matmul", "argument_bytes_per_device",
        "temp_bytes_per_device", "peak_bytes_per_device", "hbm_bytes_per_device", "fits",
        "headroom_fraction", "estimated_step_seconds", "estimated_update_seconds",
        "estimated_tokens_per_second", "estimated_mfu", "estimated_mfu_causal", "estimate_method",
        "roofline_step_seconds",
        "xla_flops_per_device", "xla_bytes_accessed_per_device", "collectives", "compile_seconds",
        "model_flops_per_step", "peak_bf16_flops_per_device", "num_params", "attention_impl",
        "expert_exchange",
        "splash_flops_per_device")

# Dropless with experts sharded: each device reserves twice the balanced share of its
# assignments per expert shard (as the other TPU plans); beyond it rows would be dropped and
# counted (docs/routing.md). MaxText's megablox path has no such buffer.
_DROPLESS = "CAPACITY_MODE='dropless' EP_BUFFER_FACTOR=2.0"
# FSDP over data: docs/sharding.md's override shards the non-expert kernels' `embed` axis;
# the expert kernels name theirs `mlp_embed`, so _FSDP_ALL shards those over data too.
_FSDP = "openmoe_jax.partitioning.axis_rules.overrides=[('embed','data')]"
_FSDP_ALL = "openmoe_jax.partitioning.axis_rules.overrides=[('embed','data'),('mlp_embed','data')]"
_MIXTRAL_RUN = ("models/mixtral_8x7b.gin+runs/pretrain.gin v5p-128 "
                "TASK_FEATURE_LENGTHS={'targets':1024} BATCH_SIZE=512 OPTIMIZER='adamw' "
                "REMAT_POLICY='full' TRAIN_STEPS=100000 "
                "OPTIMIZER_KWARGS={'decay_steps':100000,'weight_decay':0.1,'grad_clip_norm':1.0}")
# Named cases (--case NAME). Mixtral-8x7B on v5p-128 (64 chips), beside MaxText's measured MFU
# for that model and slice (benchmarks/RESULTS.md): MaxText's own v5p-128 pretraining settings
# (tests/end_to_end/tpu/mixtral/8x7b/2_test_mixtral.sh of the commit that published the
# number: per_device_batch_size=8, max_target_length=1024, ici_fsdp_parallelism=64, bfloat16,
# megablox dropless, remat 'full', AdamW), i.e. 512 x 1024 tokens, as our meshes allow them.
# `_probeN` are N-layer probes for --extrapolate.
NAMED = {}
for _name, _mesh in (
    # data 8 x expert 8 (one expert per chip), parameters FSDP over data: 64-way like MaxText.
    ("mixtral_v5p128_fsdp8_ep8", f"NUM_EXPERT_PARTITIONS=8 NUM_MODEL_PARTITIONS=1 "
                                 f"{_DROPLESS} {_FSDP}"),
    # ... and the expert kernels FSDP over data too: every parameter 64-way.
    ("mixtral_v5p128_fsdp8_ep8_all", f"NUM_EXPERT_PARTITIONS=8 NUM_MODEL_PARTITIONS=1 "
                                     f"{_DROPLESS} {_FSDP_ALL}"),
    # expert 8 x model 8, no FSDP (parameters replicated over data = 1).
    ("mixtral_v5p128_ep8_tp8", f"NUM_EXPERT_PARTITIONS=8 NUM_MODEL_PARTITIONS=8 {_DROPLESS}"),
    # MaxText's own layout: every chip on data, parameters FSDP 64-way, all 8 experts on every
    # chip: no token exchange, so dropless exactly, with megablox's kernels (GROUPED_MATMUL
    # 'pallas', openmoe_jax/model/pallas_grouped.py) or XLA's ragged_dot.
    ("mixtral_v5p128_fsdp64_pallas", f"NUM_EXPERT_PARTITIONS=1 NUM_MODEL_PARTITIONS=1 "
                                     f"CAPACITY_MODE='dropless' GROUPED_MATMUL='pallas' {_FSDP}"),
    ("mixtral_v5p128_fsdp64_ragged", f"NUM_EXPERT_PARTITIONS=1 NUM_MODEL_PARTITIONS=1 "
                                     f"CAPACITY_MODE='dropless' GROUPED_MATMUL='ragged_dot' "
                                     f"{_FSDP}"),
    # The first mesh with fixed capacity 1.25 instead of dropless (MaxText's "dropped"
    # setting, capacity_factor=1.25); the gather dispatch has no SparseCore scatter, so the
    # cost model gives it a time.
    ("mixtral_v5p128_fsdp8_ep8_cf125", f"NUM_EXPERT_PARTITIONS=8 NUM_MODEL_PARTITIONS=1 "
                                       f"CAPACITY_MODE='fixed' "
                                       f"TRAIN_EXPERT_CAPACITY_FACTOR=1.25 {_FSDP}"),
):
  for _layers in (1, 2, 4):
    NAMED[f"{_name}_probe{_layers}"] = (
        f"{_MIXTRAL_RUN} {_mesh} NUM_DECODER_LAYERS={_layers} NUM_DECODER_SPARSE_LAYERS={_layers}")


def run_case(case: str) -> dict:
  from openmoe_jax import gin_utils
  from openmoe_jax.planning import tpu
  from openmoe_jax.commands import compile_only as tpu_plan
  gin_file, slice_name, *macros = NAMED.get(case, case).split()
  gin_files = [f if "/" in f or f.endswith(".gin") else f"openmoe/{f}.gin"
               for f in gin_file.split("+")]
  tpu.compile_host(tpu.parse_slice(slice_name))
  import tasks  # noqa: F401  the run gins import it
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin(gin_files, list(macros), finalize=False)
  cfg = gin_utils.model_config()
  t = time.time()
  out = tpu_plan.plan_of_run(cfg, slice_name)  # the step openmoe-train --compile_only plans
  row = {"case": case, "wall_seconds": round(time.time() - t, 1)}
  if case in NAMED:
    row["expands_to"] = NAMED[case]
  row["num_layers"] = cfg.num_layers
  row.update({k: out.get(k) for k in KEYS + ("compile_error",) if k in out})
  return row


def table(path: str) -> str:
  """The JSON lines of `path` as the markdown table of benchmarks/RESULTS.md."""
  gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
  lines = ["| case | devices (data, expert, model) | microbatches | args GiB | temp GiB | peak GiB "
           "| HBM GiB | headroom | est. step s | est. tokens/s | est. MFU | all-to-all GiB (n) "
           "| all-reduce GiB (n) | all-gather GiB (n) | coll.-permute GiB (n) |",
           "|" + "---|" * 15]
  for line in open(path):
    r = json.loads(line)
    if "error" in r:
      lines.append(f"| {r['case']} | error: {r['error'][:80]} |" + " |" * 13)
      continue
    c = r.get("collectives") or {}
    coll = lambda k: (f"{c[k]['bytes'] / 2**30:.1f} ({c[k]['count']})" if k in c else "-")
    est = r.get("estimated_step_seconds")
    m = r["mesh"]
    lines.append(
        f"| {r['case']} | {r['num_devices']} ({m['data']}, {m['expert']}, {m['model']}) "
        f"| {r['num_microbatches']} | {gib(r.get('argument_bytes_per_device'))} "
        f"| {gib(r.get('temp_bytes_per_device'))} | {gib(r['peak_bytes_per_device'])} "
        f"| {gib(r['hbm_bytes_per_device'])} | "
        + (f"{r['headroom_fraction']:.1%}" if r.get("fits") else "**does not fit**")
        + (f" | {est:.3f} | {r['estimated_tokens_per_second']:,.0f} | {r['estimated_mfu']:.2f}"
           if est else " | - | - | -")
        + f" | {coll('all-to-all')} | {coll('all-reduce')} | {coll('all-gather')} "
          f"| {coll('collective-permute')} |")
  return "\n".join(lines)


_LAYER_MACROS = ("NUM_DECODER_LAYERS=", "NUM_DECODER_SPARSE_LAYERS=")


def _without_layers(case: str) -> str:
  return " ".join(w for w in NAMED.get(case, case).split() if not w.startswith(_LAYER_MACROS))


def full_depth(case: str) -> int:
  """NUM_DECODER_LAYERS of the case's gins without its layer overrides (parses gin only)."""
  from openmoe_jax import gin_utils
  gin_file, _, *macros = _without_layers(case).split()
  import tasks  # noqa: F401
  from openmoe_jax.commands import configurables  # noqa: F401
  gin_utils.parse_gin([f if "/" in f or f.endswith(".gin") else f"openmoe/{f}.gin"
                       for f in gin_file.split("+")], macros, finalize=False)
  return gin_utils.model_config().num_layers


def extrapolate_rows(a: dict, b: dict, layers: int) -> dict:
  """The whole-depth row from two probe rows of one case at depths a < b (module docstring):
  every additive quantity v taken as v(a) + (layers - La) x (v(b) - v(a)) / (Lb - La)."""
  la, lb = a["num_layers"], b["num_layers"]
  lin = lambda va, vb: va + (layers - la) * (vb - va) / (lb - la)
  out = {"case": _without_layers(a["case"]) + f" (extrapolated to {layers} layers from "
                                               f"{la} and {lb})",
         "probe_layers": [la, lb], "num_layers": layers, "probe_cases": [a["case"], b["case"]]}
  for k in ("accelerator_type", "num_devices", "mesh", "batch_size", "num_microbatches", "seq_len",
            "remat_policy", "dispatch", "capacity_mode", "grouped_matmul", "hbm_bytes_per_device",
            "peak_bf16_flops_per_device", "estimate_method"):
    out[k] = b.get(k)
  for k in ("argument_bytes_per_device", "temp_bytes_per_device", "peak_bytes_per_device",
            "estimated_step_seconds", "roofline_step_seconds", "xla_flops_per_device",
            "xla_bytes_accessed_per_device", "model_flops_per_step", "num_params"):
    if a.get(k) is not None and b.get(k) is not None:
      out[k] = lin(a[k], b[k])
      out[k + "_per_layer"] = (b[k] - a[k]) / (lb - la)
      out[k + "_fixed"] = a[k] - la * (b[k] - a[k]) / (lb - la)
  if a.get("estimate_method") != b.get("estimate_method"):
    out["estimate_method"] = f"mixed: {a.get('estimate_method')} / {b.get('estimate_method')}"
  ca, cb = a.get("collectives") or {}, b.get("collectives") or {}
  out["collectives"] = {k: {f: lin(ca[k][f], cb[k][f]) for f in ("count", "bytes")}
                        for k in ca if k in cb}
  peak, hbm = out.get("peak_bytes_per_device"), out["hbm_bytes_per_device"]
  if peak is not None:
    out["fits"] = peak <= hbm
    out["headroom_fraction"] = 1 - peak / hbm
  est = out.get("estimated_step_seconds")
  if est and out.get("model_flops_per_step"):
    out["estimated_tokens_per_second"] = out["batch_size"] * out["seq_len"] / est
    out["estimated_mfu"] = out["model_flops_per_step"] / (
        est * out["num_devices"] * out["peak_bf16_flops_per_device"])
  out["note"] = ("XLA:TPU compiler estimate (libtpu cost model), extrapolated linearly in layers "
                 "from two compiled probe depths; nothing ran on a TPU")
  return out


def extrapolate(path: str) -> list:
  """Rows of `path` grouped by their case without the layer macros; for each group with two or
  more depths, the whole-depth row from its shallowest and deepest probe."""
  groups = {}
  for line in open(path):
    r = json.loads(line)
    if "error" in r or not r.get("estimated_step_seconds") or "num_layers" not in r:
      continue
    groups.setdefault(_without_layers(r["case"]), {})[r["num_layers"]] = r
  out = []
  for key, rows in groups.items():
    if len(rows) < 2:
      continue
    depths = sorted(rows)
    row = extrapolate_rows(rows[depths[0]], rows[depths[-1]], full_depth(key))
    if len(depths) > 2:  # a middle depth checks the line: its value against the line's
      mid, la, lb = rows[depths[1]], depths[0], depths[-1]
      check = {}
      for k in ("peak_bytes_per_device", "estimated_step_seconds"):
        va, vb = rows[la][k], rows[lb][k]
        check[k] = {"compiled": mid[k], "line": va + (depths[1] - la) * (vb - va) / (lb - la)}
      row["linearity_check_at_%d_layers" % depths[1]] = check
    out.append(row)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", action="append", default=[],
                 help='"<recipe> <slice> [MACRO=value ...]", repeatable')
  p.add_argument("--table", help="print the JSON lines of this file as a markdown table")
  p.add_argument("--out", help="also append each JSON line to this file")
  p.add_argument("--extrapolate", help="print, for each case of this file compiled at two or more "
                 "depths, the whole-depth row (module docstring) as a JSON line")
  args = p.parse_args(argv)
  if args.table:
    print(table(args.table))
  if args.extrapolate:
    from openmoe_jax.planning import tpu
    tpu.quiet_cpu_default()
    for row in extrapolate(args.extrapolate):
      print(json.dumps(row))
  cases.run_cases(args.case, run_case, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
