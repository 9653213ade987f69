"""Downstream metric functions, seqio style: the argument names say what a metric needs.

Predict-based (`targets`, `predictions`): exact match and token F1 with SQuAD's answer
normalisation (TriviaQA's official metric; t5 `evaluation/metrics.py::trivia_qa`), a target may be
a list of acceptable answers (the best one counts); pass@k with the unbiased estimator of Chen et
al. 2021 (HumanEval, `pass_at_k`) over results of an execution hook, n per example.
Score-based (`targets`, `scores`): multiple choice by log-likelihood, lm-eval-harness style: `acc`
picks the choice with the highest summed log-probability, `acc_norm` the highest per character
of the choice (so long choices are not penalised for their length).
All return {name: value in percent} like t5's metrics.
"""
import collections
import re
import string
from typing import Callable, Dict, List, Sequence, Union

import numpy as np

Target = Union[str, Sequence[str]]


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _answers(target: Target) -> List[str]:
  return [target] if isinstance(target, str) else list(target)


def _f1(prediction: str, answer: str) -> float:
  pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
  common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if not pred or not gold:
    return float(pred == gold)
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def exact_match(targets: Sequence[Target], predictions: Sequence[str]) -> Dict[str, float]:
  """Percent of predictions equal (after normalisation) to one of their target's answers."""
  hits = [max(normalize_answer(p) == normalize_answer(a) for a in _answers(t))
          for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


def f1(targets: Sequence[Target], predictions: Sequence[str]) -> Dict[str, float]:
  """Mean over examples of the best token F1 between the prediction and an answer, percent."""
  scores = [max(_f1(p, a) for a in _answers(t)) for t, p in zip(targets, predictions)]
  return {"f1": 100.0 * float(np.mean(scores)) if scores else 0.0}


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(ks: Sequence[int] = (1,)) -> Callable:
  """A metric over predictions that are lists of booleans (one per sample: did it pass the
  task's tests?), as an execution hook produces them. pass@k is reported for the ks that every
  example has at least k samples for (so one greedy sample per prompt gives pass@1 only)."""
  def metric(targets, predictions) -> Dict[str, float]:
    del targets
    out = {}
    for k in ks:
      if predictions and all(len(p) >= k for p in predictions):
        out[f"pass@{k}"] = 100.0 * float(np.mean(
            [pass_at_k_estimate(len(p), int(sum(p)), k) for p in predictions]))
    return out
  return metric


def multiple_choice(targets: Sequence[int], scores) -> Dict[str, float]:
  """targets: the right choice per example; scores: per example, per choice (sum of log-probs,
  characters of the choice). Ties go to the first choice (np.argmax)."""
  acc, acc_norm = [], []
  for label, choices in zip(targets, scores):
    logp = np.asarray([s for s, _ in choices], np.float64)
    chars = np.asarray([max(n, 1) for _, n in choices], np.float64)
    acc.append(int(np.argmax(logp)) == int(label))
    acc_norm.append(int(np.argmax(logp / chars)) == int(label))
  mean = lambda xs: 100.0 * float(np.mean(xs)) if xs else 0.0
  return {"accuracy": mean(acc), "accuracy_norm": mean(acc_norm)}
