"""`openmoe-train`: t5x-style command line for the gin-configured training loop.

    openmoe-train --gin_file=quickstart.gin
    openmoe-train --gin_file=models/openmoe_8b.gin --gin_file=runs/pretrain.gin \\
        --gin.MODEL_DIR="'/data/run1'" --gin.MIXTURE_OR_TASK_NAME="'mix_ul2'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 1024, 'targets': 1024}" \\
        --gin.TRAIN_STEPS=500000 --gin.BATCH_SIZE=1024

Multi-host: on TPU VMs jax.distributed initialises itself; elsewhere pass --coordinator_address,
--process_count and --process_index on every process.
"""
import argparse
import os
import sys

REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS",
                   "BATCH_SIZE")


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
  from openmoe_jax import gin_utils
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  g = parser.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator_address", help="host:port of process 0's coordinator")
  g.add_argument("--process_count", type=int, help="number of processes in the job")
  g.add_argument("--process_index", type=int, help="this process's index, 0-based")
  g.add_argument("--num_cpu_devices", type=int,
                 help="CPU only: local devices per process (for multi-process runs on one host)")
  return parser


def init_distributed(args) -> None:
  import jax
  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  if args.coordinator_address:
    if args.process_count is None or args.process_index is None:
      from openmoe_jax.gin_utils import UsageError
      raise UsageError("--coordinator_address needs --process_count and --process_index")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.process_count, process_id=args.process_index,
                               initialization_timeout=300)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def check_required(names) -> None:
  """Fails with one line naming every %gin.REQUIRED macro the command line left unset."""
  import gin
  from openmoe_jax.gin_utils import UsageError
  missing = []
  for name in names:
    try:
      value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
      missing.append(name)
      continue
    if "REQUIRED" in repr(value):
      missing.append(name)
  if missing:
    raise UsageError("required macros not set: " + ", ".join(missing)
                     + " (e.g. --gin." + missing[0] + "=...)")


def main(argv=None):
  from openmoe_jax import gin_utils
  parser = build_parser("openmoe-train", __doc__)
  try:
    dot, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    if not args.gin_file:
      raise gin_utils.UsageError("--gin_file is required, e.g. --gin_file=quickstart.gin")
    init_distributed(args)
    import tasks  # noqa: F401  registers the seqio tasks the run gins name
    from openmoe_jax import train as train_lib
    gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot, args.gin_search_paths)
    check_required(REQUIRED_MACROS)
    cfg = gin_utils.model_config()
    train_lib.train(cfg)
  except gin_utils.UsageError as e:
    print(f"openmoe-train: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from openmoe_jax import train as train_lib
    if isinstance(e, train_lib.TrainingError):
      print(f"openmoe-train: {e}", file=sys.stderr)
      return 1
    raise  # a bug, not a user error: the traceback is for developers
  return 0


if __name__ == "__main__":
  sys.exit(main())
