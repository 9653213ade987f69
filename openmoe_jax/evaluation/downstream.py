"""Downstream evaluation of a checkpoint on seqio tasks with metric functions (t5x `eval.py`).

An eval task is a seqio Task registered with `register_task` (tasks/downstream.py,
tasks/builtin_eval.py): its source yields text examples, and its `metric_fns` say how to
evaluate, by their argument names as in seqio:
  * predict metrics (`targets`, `predictions`): greedy generation from the example's "inputs"
    (decoding.py), cut at the first newline when the spec says so, then the task's
    postprocess_fn; targets are the example's "answers" when present (aliases), else "targets".
    A spec `execute` hook turns completions into pass/fail results first (pass@k). Sampling
    instead of greedy decoding: `temperature` / `top_p` (decoding.Sampling); for a task with an
    execute hook, `num_samples` completions per prompt, sample j drawn with the key
    fold_in(key(sample_seed), j), and pass@k for every k of the task's metric up to num_samples
    (HumanEval practice, Chen et al. 2021: pass@1 at temperature 0.2, pass@10 and pass@100 at
    0.8, top_p 0.95, n = 200).
  * score metrics (`targets`, `scores`): multiple choice by the log-likelihood of each of the
    example's "choices" after its "inputs" (lm-eval-harness style); targets are the "label"s.
Few-shot prompts prepend `num_shots` examples of the task's few-shot split, drawn with a fixed
seed (the example itself excluded), each written as inputs + answer + the spec's separator.
Prompts longer than the length budget lose tokens from the left, as t5x truncates inputs.
"""
import dataclasses
from typing import Callable, Dict, List, Optional

import numpy as np

from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.data import pipeline as data
from openmoe_jax.evaluation import decoding
from openmoe_jax.evaluation import likelihood
from openmoe_jax import fs
from openmoe_jax.training import metrics_writer

SPECS: Dict[str, "EvalSpec"] = {}
FIELDS = {"predict": ("inputs", "targets"), "score": ("inputs", "choices", "label")}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """How to prompt and decode for one eval task (what seqio's Task does not hold)."""
  max_new_tokens: int = 32
  stop_at_newline: bool = True
  separator: str = "\n\n"
  fewshot_split: str = "train"
  execute: Optional[Callable] = None  # (example, completion) -> bool, for pass@k (run by
                                      # a thread pool: it must be thread-safe)


def register_task(name: str, source, vocabulary, metric_fns, spec: EvalSpec = EvalSpec(),
                  postprocess_fn=None) -> None:
  """Registers an eval task (idempotent)."""
  import seqio
  SPECS[name] = spec
  if name in seqio.TaskRegistry.names():
    return
  features = {"inputs": seqio.Feature(vocabulary, add_eos=False, required=False),
              "targets": seqio.Feature(vocabulary, add_eos=False)}
  seqio.TaskRegistry.add(name, source=source, preprocessors=[], output_features=features,
                         metric_fns=list(metric_fns), postprocess_fn=postprocess_fn)


def eval_tasks(name: str) -> List[str]:
  """The eval tasks under a task or mixture name ([] when it is not an eval task)."""
  import seqio
  if name in SPECS:
    return [name]
  if name in seqio.MixtureRegistry.names():
    subtasks = [t.name for t in seqio.get_mixture_or_task(name).tasks]
    return subtasks if subtasks and all(t in SPECS for t in subtasks) else []
  return []


def _text(x):
  """numpy / bytes values of tf.data examples as str, int and lists."""
  if isinstance(x, np.ndarray):
    return _text(x.item()) if x.ndim == 0 else [_text(v) for v in x]
  if isinstance(x, bytes):
    return x.decode("utf-8")
  return x.item() if isinstance(x, np.generic) else x


def read_examples(name: str, split: str, limit: Optional[int] = None) -> List[dict]:
  """The first `limit` examples of a task's split as plain Python values (source order)."""
  import seqio
  task = seqio.get_mixture_or_task(name)
  if split not in task.source.splits:
    raise UsageError(f"task {name} has no split {split!r} (has {', '.join(task.source.splits)})")
  try:
    ds = task.source.get_dataset(split=split, shuffle=False)
    if limit:
      ds = ds.take(limit)
    return [{k: _text(v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(error_line(e)) from None


def prompt_rows(name: str, split: str, limit: Optional[int]) -> List[dict]:
  """openmoe-infer prompts from a task: [{"prompt", "target"}] (the caller registers its tasks,
  e.g. `import tasks`)."""
  try:
    data.get_provider(name)
  except ValueError as e:
    raise UsageError(str(e).splitlines()[0]) from None
  rows = read_examples(name, split, limit)
  if not rows:
    raise UsageError(f"task {name} has no examples in split {split!r}")
  if "inputs" not in rows[0]:
    raise UsageError(f"task {name} has no 'inputs' feature to prompt with (it has "
                     f"{', '.join(sorted(rows[0]))})")
  return [{"prompt": r["inputs"], **({"target": r["targets"]} if "targets" in r else {})}
          for r in rows]


def metric_kind(task) -> str:
  if task.score_metric_fns and not task.predict_metric_fns:
    return "score"
  if task.predict_metric_fns and not task.score_metric_fns:
    return "predict"
  raise UsageError(f"task {task.name} needs predict or score metric_fns (not both, not none)")


def check_fields(name: str, kind: str, example: dict) -> None:
  missing = [f for f in FIELDS[kind] if f not in example]
  if missing:
    raise UsageError(f"task {name} lacks the feature(s) {', '.join(missing)} its {kind} "
                     f"metrics need (it has {', '.join(sorted(example))})")


def answer_text(example: dict) -> str:
  return (example["choices"][example["label"]] if "choices" in example
          else example["targets"])


def fewshot_prefixes(examples, pool, num_shots: int, seed: int, separator: str) -> List[str]:
  """Per example, `num_shots` pool examples (a fixed-seed draw, never the example itself)."""
  if not num_shots:
    return [""] * len(examples)
  rng = np.random.default_rng(seed)
  out = []
  for ex in examples:
    candidates = [p for p in pool if p["inputs"] != ex["inputs"]]
    if len(candidates) < num_shots:
      raise UsageError(f"{num_shots} shots asked, but the few-shot split has {len(candidates)} "
                       "examples")
    picks = rng.choice(len(candidates), num_shots, replace=False)
    out.append("".join(candidates[i]["inputs"] + answer_text(candidates[i]) + separator
                       for i in picks))
  return out


def _run_metrics(fns, targets, **kwargs) -> Dict[str, float]:
  result = {}
  for fn in fns:
    result.update({k: float(v) for k, v in fn(targets, **kwargs).items()})
  return result


def check_sampling(num_samples: int, temperature: float, top_p: float):
  """The decoding.Sampling of the eval settings (UsageError for bad ones)."""
  if num_samples < 1:
    raise UsageError(f"NUM_SAMPLES must be >= 1, got {num_samples}")
  try:
    sampling = decoding.Sampling(temperature=float(temperature), top_p=float(top_p))
  except ValueError as e:
    raise UsageError(str(e).replace("temperature", "TEMPERATURE").replace("top_p", "TOP_P")) \
        from None
  if num_samples > 1 and sampling.temperature == 0:
    raise UsageError(f"NUM_SAMPLES={num_samples} needs TEMPERATURE > 0 (greedy samples are all "
                     "the same; HumanEval practice: 0.2 for pass@1, 0.8 for pass@10 / pass@100)")
  return sampling


def evaluate_task(params, cfg, name: str, *, split: str, budget: int, num_shots: int = 0,
                  num_examples: Optional[int] = None, fewshot_seed: int = 0,
                  batch_size: int = 16, mesh=None, num_samples: int = 1,
                  temperature: float = 0.0, top_p: float = 1.0,
                  sample_seed: int = 0) -> Dict[str, float]:
  """Metrics of one eval task: {metric: value} plus `num_examples`."""
  import seqio
  task = seqio.get_mixture_or_task(name)
  spec, kind = SPECS[name], metric_kind(task)
  sampling = check_sampling(num_samples, temperature, top_p)
  if num_samples > 1 and (kind != "predict" or spec.execute is None):
    raise UsageError(f"NUM_SAMPLES={num_samples}: task {name} has no execution hook to score "
                     "several completions per prompt with (pass@k); use NUM_SAMPLES=1")
  vocabulary = task.output_features["targets"].vocabulary
  examples = read_examples(name, split, num_examples)
  if not examples:
    raise UsageError(f"task {name} has no examples in split {split!r}")
  check_fields(name, kind, examples[0])
  pool = read_examples(name, spec.fewshot_split) if num_shots else []
  contexts = [prefix + ex["inputs"] for prefix, ex in zip(
      fewshot_prefixes(examples, pool, num_shots, fewshot_seed, spec.separator), examples)]
  if kind == "score":
    scores = likelihood.choice_scores(params, cfg, vocabulary, contexts,
                                      [ex["choices"] for ex in examples], budget=budget,
                                      batch_size=batch_size, mesh=mesh)
    result = _run_metrics(task.score_metric_fns, [ex["label"] for ex in examples], scores=scores)
  else:
    samples = []  # [num_samples][example] completions
    for j in range(num_samples):
      rng = None if sampling.temperature == 0 else sample_key(sample_seed, j)
      texts = predict(params, cfg, vocabulary, contexts, spec, budget, batch_size, mesh,
                      sampling=sampling, rng=rng)
      samples.append([task.postprocess_fn(p, example=ex, is_target=False) if task.postprocess_fn
                      else p for p, ex in zip(texts, examples)])
    if spec.execute is not None:
      predictions = execute_all(spec.execute, examples, samples)
    else:
      predictions = samples[0]
    targets = [ex.get("answers") or ex["targets"] for ex in examples]
    result = _run_metrics(task.predict_metric_fns, targets, predictions=predictions)
  result["num_examples"] = len(examples)
  return result


def evaluate_all(params, cfg, name: str, **kwargs) -> Dict[str, float]:
  """Every eval task under `name` ({task}/{metric}); a mixture adds {name}/{metric}, the mean
  over its tasks (BIG-bench Lite's score is such a mean)."""
  names = eval_tasks(name)
  result = {}
  for task in names:
    result.update({f"{task}/{k}": v for k, v in evaluate_task(params, cfg, task, **kwargs).items()})
  if len(names) > 1 or names[0] != name:
    metrics_seen = {k.split("/", 1)[1] for k in result} - {"num_examples"}
    for metric in sorted(metrics_seen):
      values = [result[f"{t}/{metric}"] for t in names if f"{t}/{metric}" in result]
      result[f"{name}/{metric}"] = float(np.mean(values))
  return result


def sample_key(seed: int, index: int):
  """The jax.random key of sample `index` (0-based) of every prompt."""
  import jax
  return jax.random.fold_in(jax.random.key(seed), index)


def execute_all(execute: Callable, examples, samples) -> List[List[bool]]:
  """Per example, the execute hook's result for each of its samples ([sample][example] in)."""
  import concurrent.futures
  import os
  pairs = [(ex, s[i]) for i, ex in enumerate(examples) for s in samples]
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    results = [bool(r) for r in pool.map(lambda pair: execute(*pair), pairs)]
  n = len(samples)
  return [results[i * n:(i + 1) * n] for i in range(len(examples))]


def predict(params, cfg, vocabulary, contexts, spec: EvalSpec, budget: int, batch_size: int,
            mesh=None, *, sampling=None, rng=None) -> List[str]:
  """Completions of the contexts (greedy unless `sampling`, a decoding.Sampling, says otherwise;
  `rng`: its jax.random key), truncated from the left to fit the budget."""
  room = budget - 1 - spec.max_new_tokens
  if room < 1:
    raise UsageError(f"length budget {budget} leaves no room for a prompt")
  prompts = [list(vocabulary.encode(c))[-room:] for c in contexts]
  newline = list(vocabulary.encode("a\n"))[len(list(vocabulary.encode("a"))):]
  stops = [newline] if spec.stop_at_newline and newline else []
  gens = decoding.generate(params, cfg, prompts, max_new_tokens=spec.max_new_tokens,
                           sampling=sampling or decoding.Sampling(), rng=rng,
                           stop_sequences=stops, batch_size=batch_size, mesh=mesh)
  texts = [vocabulary.decode(g.ids) for g in gens]
  return [t.split("\n")[0] if spec.stop_at_newline else t for t in texts]


def write_tensorboard(model_dir: str, step: int, results: Dict[str, float]) -> None:
  """Scalars under MODEL_DIR/tensorboard/inference_eval at the checkpoint's step (t5x's name)."""
  writer = metrics_writer._tensorboard_writer(  # pylint: disable=protected-access
      fs.join(model_dir, "tensorboard", "inference_eval"))
  if writer is None:
    return
  for key, value in results.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      writer.add_scalar(key, float(value), step)
  writer.close()
