"""Evaluation of a saved checkpoint on a split: its loss, perplexity and token accuracy, or the
metrics of an eval task (the library behind `openmoe-eval`).
"""
from typing import Optional

import gin
import jax

from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.training import run_dir
from openmoe_jax.evaluation.heldout import evaluate
from openmoe_jax.training import settings
from openmoe_jax.data import pipeline as data_lib
from openmoe_jax.model import partitioning as part
from openmoe_jax.training import steps
from openmoe_jax.evaluation import downstream


def evaluate_checkpoint(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: Optional[str] = None,
                        task_feature_lengths: Optional[dict] = None, batch_size: int = 16,
                        split: str = "validation", eval_steps: int = 20, step: Optional[int] = None,
                        eval_capacity_factor: Optional[float] = None, num_shots: int = 0,
                        num_examples: Optional[int] = None, fewshot_seed: int = 0,
                        no_drop: bool = False, num_samples: int = 1, temperature: float = 0.0,
                        top_p: float = 1.0, sample_seed: int = 0) -> dict:
  settings.check(locals(), settings.EVAL_SETTINGS)
  if num_examples is not None and (isinstance(num_examples, bool) or
                                   not isinstance(num_examples, int) or num_examples < 1):
    raise UsageError(f"NUM_EXAMPLES={num_examples!r}: must be a positive integer (or None)")
  if not (isinstance(temperature, (int, float)) and temperature >= 0):
    raise UsageError(f"TEMPERATURE={temperature!r}: must be a number >= 0")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise UsageError(f"TOP_P={top_p!r}: must be a number in (0, 1]")
  overrides = {} if eval_capacity_factor is None else {"eval_capacity_factor": eval_capacity_factor}
  overrides.update({"no_drop": True} if no_drop else {})
  cfg = run_dir.load_model_config(model_dir, overrides)
  info = run_dir.run_info(model_dir)
  name = mixture_or_task_name or info.get("mixture_or_task_name")
  lengths = task_feature_lengths or info.get("task_feature_lengths")
  if not name or not lengths:
    raise UsageError("set MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS")
  try:
    data_lib.get_provider(name)
  except ValueError as e:
    raise UsageError(error_line(e)) from None
  params, step = run_dir.load_params(model_dir, step)
  mesh = part.make_mesh()
  batch_sh = part.batch_sharding(mesh)
  if batch_size % mesh.size:
    raise UsageError(f"BATCH_SIZE={batch_size} must divide by {mesh.size} devices")
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
      run_dir.append_eval_result(model_dir, result)
      downstream.write_tensorboard(model_dir, step, result)
    return result
  if num_samples > 1 or temperature > 0:
    raise UsageError(f"NUM_SAMPLES / TEMPERATURE sample completions for an eval task "
                               f"with metrics; {name} is evaluated by its loss")
  fn = jax.jit(lambda p, b: steps.eval_step(p, b, cfg=cfg))
  it = data_lib.make_iterator(name, lengths, batch_size, split=split, shuffle=False, num_epochs=1,
                              seed=data_lib.EVAL_SEED)
  result = evaluate(params, fn, it, batch_sh, eval_steps)
  result.update(step=step, split=split, mixture_or_task_name=name,
                eval_capacity_factor=cfg.eval_capacity_factor)
  if jax.process_index() == 0:
    run_dir.append_eval_result(model_dir, result)
  return result
