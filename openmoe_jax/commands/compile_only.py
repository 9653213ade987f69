"""openmoe-train --compile_only and openmoe-info --tpu: the flags, and the plan of the step the
parsed run gins describe (`openmoe_jax.planning.plan`)."""

from openmoe_jax.errors import UsageError
from openmoe_jax.planning.plan import ESTIMATE_NOTE, plan, report  # noqa: F401
from openmoe_jax.planning import tpu


def add_flags(parser, *, compile_only: bool) -> None:
  """--tpu and --memory_budget_gib (and openmoe-train's --compile_only)."""
  g = parser.add_argument_group("TPU plan (XLA:TPU compiler from libtpu; no TPU needed)")
  if compile_only:
    g.add_argument("--compile_only", action="store_true",
                   help="compile the run's training step and print its plan as JSON, then exit "
                        "without reading data or touching MODEL_DIR (needs --tpu)")
  g.add_argument("--tpu", metavar="TYPE",
                 help="compile for this TPU slice: a Cloud TPU type (v2/v3/v4/v5p-N with N "
                      "TensorCores, v5litepod-N and v6e-N with N chips, e.g. v3-256) or a "
                      "topology such as v4:4x4x4 (needs: pip install 'openmoe_jax[tpu]')"
                      + ("" if compile_only else "; implies --compile"))
  if compile_only:  # openmoe-info defines its own --memory_budget_gib
    g.add_argument("--memory_budget_gib", type=float,
                   help="per-device budget for the plan (default: the chip's HBM); exit 3 over it")


def train_settings() -> dict:
  """`train()`'s arguments as the parsed gin files bind them (its defaults for the rest);
  macros resolved, unset %gin.REQUIRED ones (MODEL_DIR, data) left as gin's sentinel."""
  import inspect
  import gin
  from openmoe_jax.training import loop as train  # late: JAX after the flags
  params = inspect.signature(train.train).parameters
  out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
  out.update(gin.get_bindings("train"))
  return out


def plan_of_run(cfg, slice_name: str, memory_budget_gib=None) -> dict:
  """The TPU plan of exactly the step the parsed run gins describe (their mesh, batch,
  microbatches, optimizer, routing replicas and partitioning rules)."""
  from openmoe_jax import gin_utils  # late: JAX after the flags (quick --help)
  s = train_settings()
  missing = [k for k in ("batch_size", "task_feature_lengths")
             if not isinstance(s.get(k), (int, dict))]
  if missing:
    raise UsageError("--compile_only: the gin files do not set " + ", ".join(
        f"train.{k}" for k in missing))
  return plan(cfg, slice_name, num_expert_partitions=s["num_expert_partitions"],
              num_model_partitions=s["num_model_partitions"], batch_size=s["batch_size"],
              seq_len=sum(dict(s["task_feature_lengths"]).values()),
              num_microbatches=s["num_microbatches"], optimizer=s["optimizer"],
              optimizer_kwargs=s["optimizer_kwargs"], memory_budget_gib=memory_budget_gib,
              seed=s["seed"], num_expert_replicas=s["num_expert_replicas"],
              rules=gin_utils.partitioning_rules())


def compile_only(cfg, args, prog: str = "openmoe-train") -> int:
  """Prints the plan of the run's step (`plan_of_run`); exit 3 over the memory budget."""
  return report(plan_of_run(cfg, args.tpu, args.memory_budget_gib), prog)


def compile_only_command(args, dot_bindings, prog: str = "openmoe-train") -> int:
  """openmoe-train's --compile_only: parse the run's gin files (run macros that only data and
  MODEL_DIR use may stay unset), then plan its step. Reads no data, writes nothing."""
  from openmoe_jax import gin_utils  # late: JAX after the flags (quick --help)
  if not args.compile_only:
    raise UsageError("--tpu plans a run: add --compile_only (openmoe-train does not run on a "
                     "compile-only slice)")
  if not args.tpu:
    raise UsageError("--compile_only needs --tpu=TYPE (e.g. --tpu=v3-256): the slice to plan for")
  tpu.compile_host(tpu.parse_slice(args.tpu))
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from openmoe_jax.commands import configurables  # noqa: F401  late: JAX after the flags; `train`
  gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot_bindings, args.gin_search_paths,
                      finalize=False)
  return compile_only(gin_utils.model_config(), args, prog)

