"""Shared pieces of our seqio registrations: features, preprocessor lists, idempotent adds."""
import functools
from typing import Callable, Sequence, Tuple

import seqio

from openmoe_jax.data import ul2

OBJECTIVES = ("ul2", "full_lm")


def output_features(vocabulary: seqio.Vocabulary) -> dict:
  """OpenMoE's features: inputs (optional, UL2 only) and targets, both ending in EOS."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def preprocessors(objective: str, text_key: str = "text", full_lm_eos_after_trim: bool = True) -> list:
  """Source `{text_key: str}` -> tokenized -> UL2 or full-LM examples (OpenMoE's order:
  XueFuzhao/text-to-text-transfer-transformer `t5/data/tasks.py`).

  full_lm_eos_after_trim: end every full-LM row with EOS as T5 does (True, OpenMoE's tasks);
    False keeps all `targets` tokens of a row (the built-in quick-start tasks, docs/data.md).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
  steps = [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
  ]
  if objective == "ul2":
    return steps + [ul2.ul2_objective, seqio.preprocessors.append_eos_after_trim]
  # As T5's full_lm task (XueFuzhao/text-to-text-transfer-transformer `t5/data/tasks.py`): EOS
  # at document boundaries, `targets`-long rows, then append_eos_after_trim makes each full
  # row its first 2047 tokens + EOS (the row's 2048th token is dropped, as in OpenMoE).
  if not full_lm_eos_after_trim:
    return steps + [ul2.full_lm]
  return steps + [ul2.full_lm, seqio.preprocessors.append_eos_after_trim]


def add_task(name: str, source: seqio.DataSource, objective: str,
             vocabulary: seqio.Vocabulary, full_lm_eos_after_trim: bool = True) -> None:
  """Registers a task unless a task of that name exists (re-import / re-call is a no-op)."""
  if name in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(name, source=source,
                         preprocessors=preprocessors(
                             objective, full_lm_eos_after_trim=full_lm_eos_after_trim),
                         output_features=output_features(vocabulary), metric_fns=[])


def add_task_pair(prefix: str, make_source: Callable[[], seqio.DataSource],
                  vocabulary: seqio.Vocabulary,
                  full_lm_eos_after_trim: bool = True) -> Tuple[str, str]:
  """Registers `<prefix>_ul2` and `<prefix>_full_lm` on sources from `make_source`."""
  names = tuple(f"{prefix}_{objective}" for objective in OBJECTIVES)
  for name, objective in zip(names, OBJECTIVES):
    add_task(name, make_source(), objective, vocabulary, full_lm_eos_after_trim)
  return names


def add_mixture(name: str, tasks_and_rates: Sequence[Tuple[str, float]]) -> None:
  """Registers a mixture unless one of that name exists; zero-rate tasks are left out."""
  if name in seqio.MixtureRegistry.names():
    return
  seqio.MixtureRegistry.add(name, [(t, r) for t, r in tasks_and_rates if r > 0],
                            default_rate=1.0)
