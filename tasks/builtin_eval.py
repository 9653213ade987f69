"""Two small eval tasks made from the built-in corpus, so the quick-start model is evaluated offline.

* `builtin_function_name` (predict): "# <first docstring line>\\ndef" -> the function's name,
  e.g. "# Return the absolute version of a path.\\ndef" -> " abspath". Metrics: exact match and
  F1 over the name's words (underscores split words).
* `builtin_next_line` (multiple choice): four consecutive lines of a stdlib file, then the true
  next line among 3 distractor lines from other files, re-indented like the true one. Metrics:
  accuracy and per-character accuracy of the log-likelihood choice (chance: 25%).

Examples come from the corpus split's files in sorted order with fixed seeds (the train split
serves few-shot prompts), so every machine with the same Python builds the same examples.
"""
import ast
import re
import zlib

import numpy as np

from openmoe_jax.data import corpus
from openmoe_jax.evaluation import downstream
from openmoe_jax.evaluation import metrics
from openmoe_jax.data import vocab

CONTEXT_LINES = 4
CHOICES = 4
LINES_PER_FILE = 6


def _stdlib_relative(path: str) -> str:
  return str(path).replace(str(corpus.stdlib_root()) + "/", "")


def function_name_examples(split: str) -> list:
  out = []
  for path in corpus.list_files(split):
    try:
      tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
      if len(doc) < 10 or len(doc) > 100 or node.name.startswith("__"):
        continue
      # The space before the name belongs to the name's first piece ("▁glob"), as in running
      # text: a prompt ending in a space would end in a lone "▁" the model has rarely seen.
      out.append({"inputs": f"# {doc}\ndef", "targets": " " + node.name,
                  "answers": [node.name.replace("_", " ").strip()]})
  return out


def _good_line(line: str) -> bool:
  s = line.strip()
  return len(s) >= 10 and not s.startswith(("#", '"', "'"))


def next_line_examples(split: str) -> list:
  files = corpus.list_files(split)
  pool = []
  texts = {}
  for path in files:
    try:
      texts[path] = open(path, encoding="utf-8").read().split("\n")
    except (UnicodeDecodeError, OSError):
      continue
    pool.extend((path, l) for l in texts[path] if _good_line(l) and len(l) < 100)
  out = []
  for path, lines in texts.items():
    rng = np.random.default_rng(zlib.crc32(_stdlib_relative(path).encode()))
    spots = [i for i in range(CONTEXT_LINES, len(lines))
             if _good_line(lines[i]) and len(lines[i]) < 100
             and sum(bool(l.strip()) for l in lines[i - CONTEXT_LINES:i]) >= 2]
    for i in sorted(rng.choice(spots, min(LINES_PER_FILE, len(spots)), replace=False)):
      answer = lines[i]
      indent = answer[:len(answer) - len(answer.lstrip())]
      distractors = []
      while len(distractors) < CHOICES - 1:
        other_path, other = pool[rng.integers(len(pool))]
        other = indent + other.strip()
        if other_path != path and other != answer and other not in distractors:
          distractors.append(other)
      label = int(rng.integers(CHOICES))
      choices = distractors[:label] + [answer] + distractors[label:]
      out.append({"inputs": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n", "choices": choices,
                  "label": label})
  return out


def _source(make_examples, keys):
  import seqio
  import tensorflow as tf

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    examples = make_examples(split)
    columns = {k: [ex[k] for ex in examples] for k in keys}
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.int32 if k == "label" else tf.string)
         for k, v in columns.items()})
  return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))


def _name_postprocess(output, example=None, is_target=False):
  del example
  if is_target:
    return output
  m = re.match(r"\s*([A-Za-z_]\w*)", output)
  return m.group(1).replace("_", " ").strip() if m else ""


def register() -> None:
  vocabulary = vocab.builtin_vocabulary()
  downstream.register_task(
      "builtin_function_name", _source(function_name_examples, ("inputs", "targets", "answers")),
      vocabulary, [metrics.exact_match, metrics.f1],
      downstream.EvalSpec(max_new_tokens=8, stop_at_newline=True, separator="\n\n"),
      postprocess_fn=_name_postprocess)
  downstream.register_task(
      "builtin_next_line", _source(next_line_examples, ("inputs", "choices", "label")),
      vocabulary, [metrics.multiple_choice], downstream.EvalSpec(separator="\n\n"))


register()
