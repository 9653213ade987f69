"""TPU plans of OpenMoE's recipes (and variants) with XLA:TPU from libtpu, one JSON line each.

    python benchmarks/tpu_plan.py --case "8b_stage1 v3-256" --case "8b_stage1 v3-256 NUM_MICROBATCHES=16"
    python benchmarks/tpu_plan.py --case "8b_stage1 v5p-256 NUM_MODEL_PARTITIONS=4" --out plans.jsonl
    python benchmarks/tpu_plan.py --table plans.jsonl      # the markdown table of RESULTS.md

A case is "<recipe gin in gin/openmoe/ or any gin> <slice> [MACRO=value ...]": the run's step
exactly as `openmoe-train --gin_file=openmoe/<recipe>.gin --compile_only --tpu=<slice>` plans
it (same code path), with the macros overridden. Each big compile takes minutes and ~13 GB of
host memory: run one at a time. Every time and MFU printed is a compiler estimate.
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
        "estimated_tokens_per_second", "estimated_mfu", "estimate_method", "roofline_step_seconds",
        "xla_flops_per_device", "xla_bytes_accessed_per_device", "collectives", "compile_seconds")


def run_case(case: str) -> dict:
  from openmoe_jax import gin_utils
  from openmoe_jax.planning import tpu
  from openmoe_jax.commands import compile_only as tpu_plan
  gin_file, slice_name, *macros = case.split()
  if "/" not in gin_file and not gin_file.endswith(".gin"):
    gin_file = f"openmoe/{gin_file}.gin"
  tpu.compile_host(tpu.parse_slice(slice_name))
  import tasks  # noqa: F401  the run gins import it
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin([gin_file], list(macros), finalize=False)
  cfg = gin_utils.model_config()
  t = time.time()
  out = tpu_plan.plan_of_run(cfg, slice_name)  # the step openmoe-train --compile_only plans
  row = {"case": case, "wall_seconds": round(time.time() - t, 1)}
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", action="append", default=[],
                 help='"<recipe> <slice> [MACRO=value ...]", repeatable')
  p.add_argument("--table", help="print the JSON lines of this file as a markdown table")
  p.add_argument("--out", help="also append each JSON line to this file")
  args = p.parse_args(argv)
  if args.table:
    print(table(args.table))
  cases.run_cases(args.case, run_case, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
