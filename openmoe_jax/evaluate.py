"""`openmoe-eval`: loss, perplexity and token accuracy of a saved checkpoint on a split; or, for
an eval task with metrics (downstream.py), its metrics.

    openmoe-eval --gin_file=runs/eval.gin --gin.MODEL_DIR="'runs/quickstart'"
    openmoe-eval --gin.MODEL_DIR="'runs/quickstart'" \
        --gin.MIXTURE_OR_TASK_NAME="'builtin_next_line'" --gin.NUM_SHOTS=2

The model comes from MODEL_DIR/model_config.json (written by openmoe-train); the data from
MIXTURE_OR_TASK_NAME / TASK_FEATURE_LENGTHS (default: what the run trained on). Eval routing
settings apply (EVAL_EXPERT_CAPACITY_FACTOR). Results are printed as JSON and appended to
MODEL_DIR/eval_results.jsonl; metric results also go to TensorBoard
(MODEL_DIR/tensorboard/inference_eval) at the checkpoint's step. Generation is greedy unless
TEMPERATURE > 0; NUM_SAMPLES > 1 draws that many completions per prompt for a task with an
execution hook (humaneval) and reports pass@k for its ks up to NUM_SAMPLES:

    openmoe-eval --gin.MODEL_DIR="'runs/base'" --gin.MIXTURE_OR_TASK_NAME="'humaneval'" \
        --gin.NUM_SAMPLES=200 --gin.TEMPERATURE=0.8 --gin.TOP_P=0.95
"""
import json
import sys
from typing import Optional

import gin
import jax

from openmoe_jax import fs, gin_utils, run_dir
from openmoe_jax import train  # noqa: F401  registers `train` (run gins bind it) before gin locks
from openmoe_jax.eval_loop import evaluate


@gin.configurable
def evaluate_checkpoint(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: Optional[str] = None,
                        task_feature_lengths: Optional[dict] = None, batch_size: int = 16,
                        split: str = "validation", eval_steps: int = 20, step: Optional[int] = None,
                        eval_capacity_factor: Optional[float] = None, num_shots: int = 0,
                        num_examples: Optional[int] = None, fewshot_seed: int = 0,
                        no_drop: bool = False, num_samples: int = 1, temperature: float = 0.0,
                        top_p: float = 1.0, sample_seed: int = 0) -> dict:
  from openmoe_jax import data as data_lib
  from openmoe_jax import partitioning as part
  from openmoe_jax import steps
  overrides = [] if eval_capacity_factor is None else [f"eval_capacity_factor={eval_capacity_factor}"]
  overrides += ["no_drop=true"] if no_drop else []
  cfg = run_dir.load_model_config(model_dir, overrides)
  info = run_dir.run_info(model_dir)
  name = mixture_or_task_name or info.get("mixture_or_task_name")
  lengths = task_feature_lengths or info.get("task_feature_lengths")
  if not name or not lengths:
    raise gin_utils.UsageError("set MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS")
  try:
    data_lib.get_provider(name)
  except ValueError as e:
    raise gin_utils.UsageError(gin_utils.error_line(e)) from None
  params, step = run_dir.load_params(model_dir, step)
  mesh = part.make_mesh()
  batch_sh = part.batch_sharding(mesh)
  if batch_size % mesh.size:
    raise gin_utils.UsageError(f"BATCH_SIZE={batch_size} must divide by {mesh.size} devices")
  from openmoe_jax import downstream
  if downstream.eval_tasks(name):  # a task with metric_fns: generation / scoring metrics
    result = downstream.evaluate_all(
        params, cfg, name, split=split, budget=int(sum(lengths.values())), num_shots=num_shots,
        num_examples=num_examples, fewshot_seed=fewshot_seed, batch_size=batch_size, mesh=mesh,
        num_samples=num_samples, temperature=temperature, top_p=top_p, sample_seed=sample_seed)
    result.update(step=step, split=split, mixture_or_task_name=name, num_shots=num_shots)
    if num_samples > 1 or temperature > 0:  # sampled completions (greedy rows stay as they were)
      result.update(num_samples=num_samples, temperature=temperature, top_p=top_p,
                    sample_seed=sample_seed)
    if jax.process_index() == 0:
      fs.append_text(fs.join(model_dir, "eval_results.jsonl"), json.dumps(result) + "\n")
      downstream.write_tensorboard(model_dir, step, result)
    return result
  if num_samples > 1 or temperature > 0:
    raise gin_utils.UsageError(f"NUM_SAMPLES / TEMPERATURE sample completions for an eval task "
                               f"with metrics; {name} is evaluated by its loss")
  fn = jax.jit(lambda p, b: steps.eval_step(p, b, cfg=cfg))
  it = data_lib.make_iterator(name, lengths, batch_size, split=split, shuffle=False, num_epochs=1)
  result = evaluate(params, fn, it, batch_sh, eval_steps)
  result.update(step=step, split=split, mixture_or_task_name=name,
                eval_capacity_factor=cfg.eval_capacity_factor)
  if jax.process_index() == 0:
    fs.append_text(fs.join(model_dir, "eval_results.jsonl"), json.dumps(result) + "\n")
  return result


def main(argv=None):
  from openmoe_jax.cli import build_parser, init_distributed, start_command
  start_command(argv)
  parser = build_parser("openmoe-eval", __doc__)
  try:
    dot, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    init_distributed(args)
    import tasks  # noqa: F401
    gin_utils.parse_gin(args.gin_file or ["runs/eval.gin"], args.gin_bindings + dot,
                        args.gin_search_paths)
    from openmoe_jax import evaluate as module  # the gin-bound one, also under `python -m`
    result = module.evaluate_checkpoint()
  except gin_utils.UsageError as e:
    print(f"openmoe-eval: error: {gin_utils.error_line(e)}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
