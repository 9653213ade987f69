"""What every openmoe_jax command shares: quiet start-up, gin flags, jax.distributed, one-line
errors as the last line printed, and exit codes (0 done, 1 training stopped, 2 bad input, 130
aborted by Ctrl-C).
"""
import argparse
import asyncio
import atexit
import gc
import os
import re
import sys
import threading
from typing import Callable, Tuple, Union

from openmoe_jax.errors import TrainingError, UsageError, error_line, no_space_error
from openmoe_jax.planning import tpu


def quiet_libraries() -> None:
  """Keeps library start-up noise off a user's terminal (set before TensorFlow / JAX start):
  TensorFlow's C++ INFO/WARNING lines (oneDNN, CUDA stubs) and its failed-cuInit error on
  machines without a GPU. Values the user set win."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  # orbax logs INFO/WARNING lines through absl's Python logger (e.g. "Metadata file does not
  # exist" for every checkpoint the tools read): errors only.
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  for name in ("absl", "asyncio"):
    log = logging.getLogger(name)
    if not any(isinstance(f, _DiskFullRecords) for f in log.filters):
      log.addFilter(_DiskFullRecords())
  if not isinstance(asyncio.get_event_loop_policy(), _ClosedLoopsDropCallbacks):
    asyncio.set_event_loop_policy(_ClosedLoopsDropCallbacks())
  if not _has_nvidia_gpu():
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


class _DiskFullRecords:
  """Drops orbax's and asyncio's error records (each with its traceback, one per save thread or
  pending write) whose cause is a full disk: the command reports that in one line (`run`)."""

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    full = "No space left on device" in text or "os_error_code='28'" in text
    return not (full or (exc is not None and no_space_error(exc) is not None))


class _QuietClosedLoop(asyncio.SelectorEventLoop):
  """Drops a callback scheduled from another thread after the loop closed, instead of raising.

  orbax runs each save coroutine in a loop of its own and closes it when the save fails (a full
  disk); tensorstore's writes still pending then complete on its C++ threads, whose callbacks
  into the closed loop raise and print one traceback each, hundreds, interleaved, burying the
  command's one line. Nothing can run on a closed loop either way."""

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None
    return super().call_soon_threadsafe(callback, *args, context=context)


class _ClosedLoopsDropCallbacks(asyncio.DefaultEventLoopPolicy):
  """The default event loop policy with `_QuietClosedLoop` loops (set by the commands only)."""
  _loop_factory = _QuietClosedLoop


# C++ log lines of TensorFlow, tf.text's SentencePiece and XLA that say nothing a user can act
# on (they are INFO lines, or errors about hardware the machine does not have).
_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:. ]+\d+ (port\.cc|cudart_stub\.cc|cpu_feature_guard\.cc)"
    r"|E\d{4} [\d:. ]+\d+ cuda_(platform|executor)\.cc:\d+\] failed call to cuInit"
    r"|normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty"
    r"|\s*\[\[\{\{node PyFunc\}\}\]\]"
    r"|W\d{4} [\d:. ]+\d+ op_level_cost_estimator)")


def filter_native_stderr() -> None:
  """Drops the known noise lines (above) that native libraries write to file descriptor 2.

  Python's own stderr goes through the same filter unchanged (a line is only dropped when it
  matches). Partial lines (a progress bar's carriage-return updates) pass at once. Installed by
  the console commands only, never when a command runs inside another program.
  """
  if getattr(filter_native_stderr, "installed", False):
    return
  filter_native_stderr.installed = True
  sys.stderr.flush()
  real = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def forward(data: bytes) -> None:
    try:
      os.write(real, data)
    except OSError:  # the reader went away (e.g. `| head`): keep draining, never block writers
      pass

  def pump():
    pending = b""
    while True:
      chunk = os.read(read_end, 65536)
      if not chunk:
        break
      pending += chunk
      *lines, pending = pending.split(b"\n")
      out = [l + b"\n" for l in lines if not _NOISE.match(l.decode("utf-8", "replace"))]
      if pending and b"\r" in pending:  # progress-bar updates: forward now
        out.append(pending)
        pending = b""
      if out:
        forward(b"".join(out))
    if pending:
      forward(pending)

  thread = threading.Thread(target=pump, name="openmoe-stderr-filter", daemon=True)
  thread.start()

  def drain():
    sys.stderr.flush()
    os.dup2(real, 2)  # closes the pipe's last write end: the pump sees EOF
    thread.join(timeout=5)

  atexit.register(drain)


def start_command(argv) -> None:
  """What every console command does first: quiet library start-up and, when run from the
  shell (argv None), the native-noise filter on stderr."""
  quiet_libraries()
  tpu.quiet_cpu_default()
  if argv is None:
    filter_native_stderr()


def _has_nvidia_gpu() -> bool:
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")


def _unlock_gin() -> None:
  """Ends a command's gin lock (`gin.finalize` in `gin_utils.parse_gin`) with the command: a
  later command in the same process (a notebook, the tests) may still import modules that
  register configurables (tasks/, the vocabularies)."""
  gin = sys.modules.get("gin")
  if gin is not None and gin.config_is_locked():
    gin.config._set_config_is_locked(False)  # pylint: disable=protected-access


def run(prog: str, fn: Callable[[], int], user_errors: Tuple[type, ...] = ()) -> int:
  """Runs a command's body; user errors become one line on stderr, printed last. Every command's
  `main` ends in this.

  `fn` returns the exit code. UsageError (and the command's `user_errors`, e.g. ValueError for a
  tool whose library reports bad input that way) -> 2, TrainingError -> 1, KeyboardInterrupt ->
  130, a full disk (OSError ENOSPC anywhere in the chain) -> 1; anything else is a bug and
  keeps its traceback. Objects the failed call still holds (data pipelines, whose TensorFlow
  finalizers print warnings) are collected before the line is printed, so it stays the last
  one.
  """
  from openmoe_jax.training import console  # late: JAX after the flags (quick --help)
  console.set_prog(prog)
  message, code = None, 0
  try:
    code = fn()
  except (UsageError, *user_errors) as e:
    message, code = f"{prog}: error: {error_line(e)}", 2
  except TrainingError as e:
    message, code = f"{prog}: {error_line(e)}", 1
  except KeyboardInterrupt:
    message, code = f"{prog}: aborted (Ctrl-C)", 130
  except Exception as e:  # a full disk is the user's to fix, not a bug: one line, not a traceback
    full = no_space_error(e)
    if full is None:
      raise
    where = f" writing {full.filename}" if getattr(full, "filename", None) else ""
    message, code = (f"{prog}: no space left on the device{where}: what was completely written "
                     "before (earlier checkpoints, outputs) is intact; free some space (or point "
                     "the output elsewhere) and run the same command again"), 1
  finally:
    _unlock_gin()
  if message is not None:
    gc.collect()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
  return code




def add_model_dir_flags(parser: argparse.ArgumentParser, step: bool = True) -> None:
  """The flags of every tool that reads a trained MODEL_DIR: --model_dir, --step, and model
  settings as t5x-style gin bindings (--gin.NAME=VALUE, --gin_bindings) or --model_override."""
  parser.add_argument("--model_dir", required=True, help="a MODEL_DIR written by openmoe-train "
                      "(or openmoe-import); local path or gs:// URL")
  if step:
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  g = parser.add_argument_group("model settings (applied to the saved model's config)")
  g.add_argument("--gin_bindings", action="append", default=[],
                 help="a model macro or ModelConfig field as a gin binding, e.g. "
                      "\"EVAL_EXPERT_CAPACITY_FACTOR = 2.0\" or \"ModelConfig.no_drop = True\" "
                      "(repeatable; --gin.NAME=VALUE is the same)")
  g.add_argument("--model_override", action="append", default=[],
                 help="the same as FIELD=VALUE with a ModelConfig field, e.g. no_drop=true "
                      "(repeatable)")


def check_output_file(output_file: str, **inputs) -> None:
  """UsageError when --output_file names one of the inputs (writing it would replace them)."""
  import os
  for flag, path in inputs.items():
    if path and os.path.realpath(path) == os.path.realpath(output_file):
      raise UsageError(f"--output_file is the --{flag} ({path}): writing it would replace "
                       f"the input; choose another --output_file")


def parse_tool_args(parser: argparse.ArgumentParser, argv):
  """(args, {ModelConfig field: typed value}) of a tool built with `add_model_dir_flags`:
  the --gin.NAME=VALUE / --gin_bindings model settings, then --model_override FIELD=VALUE."""
  from openmoe_jax import gin_utils  # late: JAX after the flags (quick --help)
  from openmoe_jax.model import config as config_lib  # late: JAX after the flags
  dot, rest = gin_utils.split_gin_dot_flags(list(sys.argv[1:] if argv is None else argv))
  args = parser.parse_args(rest)
  overrides = gin_utils.model_overrides(args.gin_bindings + dot)
  try:
    overrides.update(config_lib.parse_overrides(args.model_override))
  except ValueError as e:
    raise UsageError(f"--model_override: {error_line(e)}") from None
  return args, overrides


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An argparse parser with the gin flags and the multi-host flags of openmoe-train."""
  from openmoe_jax import gin_utils  # late: JAX after the flags (quick --help)
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
  address = args.coordinator_address or environ.get("OPENMOE_COORDINATOR_ADDRESS")
  if address == "auto":
    return "auto"
  if not address:
    # Several TPU workers (GKE sets their hostnames); one worker ("localhost", as the compile-only
    # TPU planner sets it) is a single process.
    gke_tpu = ("," in environ.get("TPU_WORKER_HOSTNAMES", "")
               or environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
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


