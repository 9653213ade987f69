"""Trains on a GPU cluster under SLURM: writes an sbatch script that starts openmoe-train with srun
(one process per GPU or per node) and submits it. --dry-run prints the script and submits nothing.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=48:00:00 \\
      --setup="source $HOME/openmoe_jax/.venv/bin/activate" \\
      -- --gin_file=openmoe/8b_stage1.gin --gin.MODEL_DIR="'/shared/runs/8b'" \\
      --gin.UMT5_SPM_PATH="'/shared/umt5.model'"

Inside the job, openmoe-train takes the coordinator from OPENMOE_COORDINATOR_ADDRESS (the first
node of the job, set by the script), the process count from OPENMOE_PROCESS_COUNT and its index
from SLURM_PROCID; see docs/launch.md. MODEL_DIR must be on a filesystem every node sees.
"""
import os
import re
import shlex
import shutil
import sys

import common


def build_parser() -> common.Parser:
  p = common.Parser("slurm.py", __doc__)
  p.add_argument("--nodes", type=common.positive_int, required=True, help="number of nodes")
  p.add_argument("--gpus_per_node", type=common.positive_int, default=8,
                 help="GPUs per node (default 8)")
  p.add_argument("--processes", choices=("per_gpu", "per_node"), default="per_gpu",
                 help="per_gpu: one process per GPU (nodes x gpus_per_node processes); "
                      "per_node: one process per node driving all its GPUs")
  p.add_argument("--partition", help="SLURM partition")
  p.add_argument("--account", help="SLURM account")
  p.add_argument("--time", help="time limit, e.g. 48:00:00 or 2-00:00:00")
  p.add_argument("--job_name", default="openmoe", help="SLURM job name (default openmoe)")
  p.add_argument("--port", type=int, default=8476,
                 help="port of the jax.distributed coordinator on the first node (default 8476)")
  p.add_argument("--sbatch_option", action="append", default=[],
                 help="extra #SBATCH line, repeatable, e.g. --sbatch_option=--exclusive")
  p.add_argument("--setup", action="append", default=[],
                 help="shell line run before srun, repeatable, e.g. "
                      "\"source ~/openmoe_jax/.venv/bin/activate\"")
  p.add_argument("--train_command", default="openmoe-train",
                 help="the training program on the nodes (default openmoe-train)")
  p.add_argument("--script", help="where to write the sbatch script (default JOB_NAME.sbatch)")
  return p


def check(p: common.Parser, args) -> None:
  """Every parameter error, before anything is written or submitted."""
  for flag in ("partition", "account", "job_name"):
    value = getattr(args, flag)
    if value is not None and not re.fullmatch(r"[\w.-]+", value):
      p.error(f"--{flag}={value!r}: letters, digits, '_', '.' and '-' only")
  if args.time and not re.fullmatch(r"[0-9]+(-[0-9]+)?(:[0-9]{2}){0,2}", args.time):
    p.error(f"--time={args.time!r} is not a SLURM time such as 48:00:00 or 2-00:00:00")
  if not shlex.split(args.train_command):
    p.error("--train_command is empty")
  if not 1024 <= args.port <= 65535:
    p.error(f"--port={args.port} must be in 1024..65535")
  if not args.dry_run and not shutil.which("sbatch"):
    p.error("sbatch not found on PATH (run this on a SLURM login node, or use --dry-run)")


def script(args, train_args) -> str:
  """The sbatch script, one srun step running the same openmoe-train command in every task."""
  per_node = args.gpus_per_node if args.processes == "per_gpu" else 1
  tasks = args.nodes * per_node
  sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
            f"--ntasks-per-node={per_node}", f"--gpus-per-node={args.gpus_per_node}",
            f"--output={args.job_name}-%j.out"]
  sbatch += [f"--{k}={getattr(args, k)}" for k in ("partition", "account", "time")
             if getattr(args, k)]
  lines = ["#!/bin/bash"] + [f"#SBATCH {o}" for o in sbatch + args.sbatch_option]
  lines += [f"# launch/slurm.py: {tasks} processes ({args.processes}), "
            f"{args.nodes} nodes x {args.gpus_per_node} GPUs", "set -eo pipefail"]
  lines += args.setup
  lines += ["# Process 0 runs on the first node of the job and hosts the coordinator.",
            'export OPENMOE_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST"'
            f' | head -n 1):{args.port}"',
            f"export OPENMOE_PROCESS_COUNT={tasks}",
            "# Each process's index is its SLURM_PROCID."]
  if args.processes == "per_gpu":
    lines.append("# jax.distributed gives the process with SLURM_LOCALID=i the node's GPU i.")
  else:
    lines += ["# Every process drives all GPUs of its node.",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node)))]
  srun = ["srun", f"--nodes={args.nodes}", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}",
          "--kill-on-bad-exit=1"] + shlex.split(args.train_command)
  lines.append(" \\\n  ".join([common.join(srun)] + [common.quote(a) for a in train_args]))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = build_parser()
  args, train_args = common.parse(p, argv)
  check(p, args)
  path = args.script or f"{args.job_name}.sbatch"
  text = script(args, train_args)
  if args.dry_run:
    print(text + f"# submit with: sbatch {common.quote(path)}")
    return 0
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return common.run(["sbatch", path])


if __name__ == "__main__":
  sys.exit(main())
