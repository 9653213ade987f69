"""OpenMoE's downstream evals (paper Tables 3-5; `openmoe_*_eval_{triqa,bblite,humaneval,mmlu}.gin`).

Tasks: `triviaqa` (closed-book QA, exact match / F1 over the answer aliases), `mmlu`
(57 subjects, 4-way multiple choice by log-likelihood), `humaneval` (code completion, pass@k
through an execution hook: pass@1 of greedy completions, or pass@1/10/100 for the ks up to the
number of sampled completions per prompt, openmoe-eval's NUM_SAMPLES), and `bigbench_lite` (the
24 BIG-bench Lite tasks as `bigbench_lite_<task>`, generative ones by exact match, the rest
multiple choice). Data is read from local directories (gin `tasks.downstream.eval_data_dirs.*`,
or $OPENMOE_<NAME>_DIR), TriviaQA also from TFDS (`trivia_qa/unfiltered.nocontext:1.1.0` in
tasks.sources' tfds_data_dir); a missing directory or file is a one-line error naming the path
and the setting. Vocabulary: umT5.
HumanEval executes generated code: it runs only with OPENMOE_ALLOW_CODE_EXECUTION=1.
"""
import csv
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import gin

from openmoe_jax.evaluation import downstream
from openmoe_jax.evaluation import metrics
from openmoe_jax.data import vocab
from openmoe_jax.gin_utils import UsageError, UsageFileNotFoundError

BIGBENCH_LITE = ("auto_debugging", "bbq_lite_json", "code_line_description",
                 "conceptual_combinations", "conlang_translation", "emoji_movie",
                 "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
                 "language_identification", "linguistics_puzzles", "logic_grid_puzzle",
                 "logical_deduction", "misconceptions_russian", "novel_concepts", "operators",
                 "parsinlu_reading_comprehension", "play_dialog_same_or_different",
                 "repeat_copy_logic", "strange_stories", "strategyqa", "symbol_interpretation",
                 "vitaminc_fact_verification", "winowhy")
BIGBENCH_GENERATIVE = {"auto_debugging", "conlang_translation", "linguistics_puzzles",
                       "operators", "parsinlu_reading_comprehension", "repeat_copy_logic"}
MMLU_SPLITS = {"train": "dev", "validation": "val", "test": "test"}  # dev = few-shot examples
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@gin.configurable(module="tasks.downstream")
def eval_data_dirs(triviaqa_dir: Optional[str] = None, mmlu_dir: Optional[str] = None,
                   humaneval_dir: Optional[str] = None, bigbench_dir: Optional[str] = None):
  """Local eval data (gin first, then $OPENMOE_TRIVIAQA_DIR, ..._MMLU_DIR, ..._HUMANEVAL_DIR,
  ..._BIGBENCH_DIR).

  Args:
    triviaqa_dir: `<split>.jsonl` files of {"question", "answers": [aliases]}.
    mmlu_dir: hendrycks/test's `data/` layout: `{dev,val,test}/<subject>_<split>.csv`.
    humaneval_dir: `HumanEval.jsonl[.gz]` (task_id, prompt, canonical_solution, test,
      entry_point).
    bigbench_dir: BIG-bench's `benchmark_tasks/`: `<task>/task.json`.
  """
  given = dict(triviaqa=triviaqa_dir, mmlu=mmlu_dir, humaneval=humaneval_dir,
               bigbench=bigbench_dir)
  return {k: v or os.environ.get(f"OPENMOE_{k.upper()}_DIR") for k, v in given.items()}


def _dir(name: str) -> str:
  path = eval_data_dirs()[name]
  if not path:
    raise UsageFileNotFoundError(
        f"no data for {name}: set tasks.downstream.eval_data_dirs.{name}_dir or "
        f"$OPENMOE_{name.upper()}_DIR")
  if not os.path.isdir(path):
    raise UsageFileNotFoundError(f"no data for {name}: directory not found: {path}")
  return path


def _need(path: str, name: str) -> str:
  if not glob.glob(path):
    raise UsageFileNotFoundError(f"no data for {name}: {path} not found")
  return sorted(glob.glob(path))[0]


# --------------------------------------------------------------------------- readers
def triviaqa_examples(split: str) -> list:
  from tasks import sources
  local = eval_data_dirs()["triviaqa"]
  tfds_dir = sources.data_dirs().tfds_data_dir
  if not local and tfds_dir and os.path.isdir(os.path.join(tfds_dir, "trivia_qa")):
    import tensorflow_datasets as tfds
    ds = tfds.load("trivia_qa/unfiltered.nocontext:1.1.0", split=split, data_dir=tfds_dir)
    rows = [{"question": ex["question"].decode(),
             "answers": [a.decode() for a in ex["answer"]["aliases"]]}
            for ex in tfds.as_numpy(ds)]
  else:
    path = _need(os.path.join(_dir("triviaqa"), f"{split}.jsonl"), "triviaqa")
    rows = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
  return [{"inputs": f"Question: {r['question']}\nAnswer:", "targets": " " + r["answers"][0],
           "answers": list(r["answers"])} for r in rows]


def mmlu_examples(split: str) -> list:
  folder = os.path.join(_dir("mmlu"), MMLU_SPLITS[split])
  _need(os.path.join(folder, "*.csv"), "mmlu")
  out = []
  for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
    subject = os.path.basename(path).rsplit("_", 1)[0].replace("_", " ")
    for row in csv.reader(open(path, encoding="utf-8")):
      question, options, answer = row[0], row[1:5], row[5].strip()
      text = (f"The following is a question about {subject}.\n{question}\n"
              + "".join(f"{l}. {o}\n" for l, o in zip("ABCD", options)) + "Answer:")
      out.append({"inputs": text, "choices": [" A", " B", " C", " D"],
                  "label": "ABCD".index(answer)})
  return out


def humaneval_examples(split: str) -> list:
  del split
  path = _need(os.path.join(_dir("humaneval"), "HumanEval.jsonl*"), "humaneval")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return [{"inputs": r["prompt"], "targets": r["canonical_solution"], "test": r["test"],
           "entry_point": r["entry_point"]} for r in rows]


def bigbench_examples(task: str, split: str) -> list:
  path = _need(os.path.join(_dir("bigbench"), task, "task.json"), f"bigbench_lite_{task}")
  examples = json.load(open(path, encoding="utf-8"))["examples"]
  # BIG-bench has one split; like seqio's bigbench tasks, hold out every 5th for few-shot use.
  picked = [ex for i, ex in enumerate(examples) if (i % 5 == 0) == (split == "train")]
  out = []
  for ex in picked:
    if task in BIGBENCH_GENERATIVE:
      targets = ex.get("target", "")
      targets = [targets] if isinstance(targets, str) else list(targets)
      out.append({"inputs": ex["input"] + "\n", "targets": targets[0], "answers": targets})
    else:
      scores = ex.get("target_scores") or {}
      choices = list(scores)
      best = max(range(len(choices)), key=lambda i: scores[choices[i]]) if choices else 0
      out.append({"inputs": ex["input"] + "\n", "choices": [" " + c for c in choices],
                  "label": best})
  return out


# --------------------------------------------------------------------------- execution hook
def run_humaneval_tests(example: dict, completion: str, timeout: float = 10.0) -> bool:
  """Runs prompt + completion + the task's tests in a fresh Python; True when they pass."""
  if os.environ.get("OPENMOE_ALLOW_CODE_EXECUTION") != "1":
    raise UsageError("humaneval executes model-written code: set "
                     "OPENMOE_ALLOW_CODE_EXECUTION=1 (ideally in a sandbox) to allow it")
  program = (example["inputs"] + completion + "\n\n" + example["test"] + "\n"
             + f"check({example['entry_point']})\n")
  with tempfile.TemporaryDirectory() as d:
    try:
      r = subprocess.run([sys.executable, "-c", program], cwd=d, capture_output=True,
                         timeout=timeout)
    except subprocess.TimeoutExpired:
      return False
  return r.returncode == 0


def humaneval_postprocess(output, example=None, is_target=False):
  del example, is_target
  cut = min([output.find(s) for s in HUMANEVAL_STOPS if s in output] + [len(output)])
  return output[:cut]


# --------------------------------------------------------------------------- registration
def _source(make_examples, keys, splits):
  import seqio
  import tensorflow as tf

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    rows = make_examples(split)
    def gen():
      for r in rows:
        yield {k: r[k] for k in keys}
    signature = {k: tf.TensorSpec([], tf.int32) if k == "label" else
                 tf.TensorSpec([None] if k in ("answers", "choices") else [], tf.string)
                 for k in keys}
    return tf.data.Dataset.from_generator(gen, output_signature=signature)
  return seqio.FunctionDataSource(dataset_fn, splits=splits)


def register() -> None:
  """Registers the tasks (idempotent; no data is read before a dataset is requested)."""
  import seqio
  voc = vocab.openmoe_vocabulary()
  predict_keys, mc_keys = ("inputs", "targets", "answers"), ("inputs", "choices", "label")
  downstream.register_task(
      "triviaqa", _source(triviaqa_examples, predict_keys, ("train", "validation")), voc,
      [metrics.exact_match, metrics.f1], downstream.EvalSpec(max_new_tokens=24))
  downstream.register_task(
      "mmlu", _source(mmlu_examples, mc_keys, tuple(MMLU_SPLITS)), voc,
      [metrics.multiple_choice], downstream.EvalSpec())
  downstream.register_task(
      "humaneval", _source(humaneval_examples, ("inputs", "targets", "test", "entry_point"),
                           ("test",)), voc, [metrics.pass_at_k((1, 10, 100))],
      downstream.EvalSpec(max_new_tokens=256, stop_at_newline=False, fewshot_split="test",
                          execute=run_humaneval_tests), postprocess_fn=humaneval_postprocess)
  for task in BIGBENCH_LITE:
    generative = task in BIGBENCH_GENERATIVE
    make = lambda split, task=task: bigbench_examples(task, split)
    downstream.register_task(
        f"bigbench_lite_{task}", _source(make, predict_keys if generative else mc_keys,
                                         ("train", "validation")), voc,
        [metrics.exact_match] if generative else [metrics.multiple_choice],
        downstream.EvalSpec(max_new_tokens=32))
  if "bigbench_lite" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("bigbench_lite", [f"bigbench_lite_{t}" for t in BIGBENCH_LITE],
                              default_rate=1.0)


register()
