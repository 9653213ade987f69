"""`openmoe-train`: t5x-style command line for the gin-configured training loop.

    openmoe-train --gin_file=quickstart.gin
    openmoe-train --gin_file=models/openmoe_8b.gin --gin_file=runs/pretrain.gin \\
        --gin.MODEL_DIR="'/data/run1'" --gin.MIXTURE_OR_TASK_NAME="'mix_ul2'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 1024, 'targets': 1024}" \\
        --gin.TRAIN_STEPS=500000 --gin.BATCH_SIZE=1024

Multi-host: pass --coordinator_address, --process_count and --process_index on every process, or
let a launcher set them in the environment (launch/, docs/launch.md; `distributed_settings`).
"""
import argparse
import os
import sys
from typing import Tuple, Union


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
  from openmoe_jax import gin_utils
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  g = parser.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator_address",
                 help="host:port of process 0's coordinator, or 'auto' for jax's own cluster "
                      "detection (default: $OPENMOE_COORDINATOR_ADDRESS)")
  g.add_argument("--process_count", type=int, help="number of processes in the job "
                 "(default: $OPENMOE_PROCESS_COUNT, else $SLURM_NTASKS)")
  g.add_argument("--process_index", type=int, help="this process's index, 0-based "
                 "(default: $OPENMOE_PROCESS_INDEX, else $SLURM_PROCID)")
  g.add_argument("--num_cpu_devices", type=int,
                 help="CPU only: local devices per process (for multi-process runs on one host)")
  return parser


def _env_int(environ, *names):
  from openmoe_jax.gin_utils import UsageError
  for name in names:
    if environ.get(name):
      try:
        return int(environ[name])
      except ValueError:
        raise UsageError(f"{name}={environ[name]!r} is not an integer") from None
  return None


def distributed_settings(args, environ) -> Union[None, str, Tuple[str, int, int]]:
  """How this process joins a multi-process job: None (alone), "auto" or (address, count, index).

  Each flag wins over the environment: --coordinator_address, else $OPENMOE_COORDINATOR_ADDRESS;
  --process_count, else $OPENMOE_PROCESS_COUNT, else $SLURM_NTASKS; --process_index, else
  $OPENMOE_PROCESS_INDEX, else $SLURM_PROCID. The address "auto" leaves all three to jax's cluster
  detection (Cloud TPU VMs, SLURM, Open MPI, Kubernetes), as does no address at all on GKE TPUs
  or in a SLURM step of several tasks, so srun never starts N unrelated single-process runs.
  """
  from openmoe_jax.gin_utils import UsageError
  address = args.coordinator_address or environ.get("OPENMOE_COORDINATOR_ADDRESS")
  if address == "auto":
    return "auto"
  if not address:
    gke_tpu = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    slurm_step = (all(environ.get(v) for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                                               "SLURM_PROCID", "SLURM_LOCALID"))
                  and (_env_int(environ, "SLURM_NTASKS") or 1) > 1)
    return "auto" if gke_tpu or slurm_step else None
  count = (args.process_count if args.process_count is not None
           else _env_int(environ, "OPENMOE_PROCESS_COUNT", "SLURM_NTASKS"))
  index = (args.process_index if args.process_index is not None
           else _env_int(environ, "OPENMOE_PROCESS_INDEX", "SLURM_PROCID"))
  if count is None or index is None:
    raise UsageError("--coordinator_address needs --process_count and --process_index "
                     "(or $OPENMOE_PROCESS_COUNT and $OPENMOE_PROCESS_INDEX)")
  if not 0 <= index < count:
    raise UsageError(f"process index {index} is not in 0..{count - 1}")
  return address, count, index


def init_distributed(args) -> None:
  import jax
  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  settings = distributed_settings(args, os.environ)
  if settings == "auto":
    jax.distributed.initialize(initialization_timeout=300)
  elif settings:
    address, count, index = settings
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, initialization_timeout=300)


def print_start_line() -> None:
  """One line per process, so a job's logs show who is who and that every device is there."""
  import jax
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local "
        f"devices, {jax.device_count()} global devices ({jax.default_backend()})",
        file=sys.stderr, flush=True)


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
    # Names every %gin.REQUIRED macro left unset in one line (gin itself stops at the first).
    gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot, args.gin_search_paths)
    cfg = gin_utils.model_config()
    print_start_line()
    train_lib.train(cfg)
  except gin_utils.UsageError as e:  # raised inside `train`, gin appends a second line: dropped
    print(f"openmoe-train: error: {gin_utils.error_line(e)}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from openmoe_jax import train as train_lib
    if isinstance(e, train_lib.TrainingError):
      print(f"openmoe-train: {gin_utils.error_line(e)}", file=sys.stderr)
      return 1
    raise  # a bug, not a user error: the traceback is for developers
  return 0


if __name__ == "__main__":
  sys.exit(main())
