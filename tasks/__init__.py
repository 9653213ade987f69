"""seqio registrations of openmoe_jax: importing `tasks` registers every task and mixture.

`tasks.openmoe`: OpenMoE's RedPajama / Wikipedia / The Stack tasks and `mix_*` mixtures.
`tasks.builtin`: the built-in stdlib corpus and the quick-start mixture `builtin_mix`.
`tasks.builtin_eval`, `tasks.downstream`: eval tasks with metrics (openmoe-eval): two built from
the built-in corpus, and OpenMoE's TriviaQA, MMLU, HumanEval and BIG-bench Lite.
Registration is idempotent and reads no data; sources resolve when a dataset is requested.
Gin run files import this module (`import tasks`), as t5x imports `t5.data.mixtures`.
"""
from tasks import builtin  # noqa: F401  pylint: disable=unused-import
from tasks import builtin_eval  # noqa: F401  pylint: disable=unused-import
from tasks import downstream  # noqa: F401  pylint: disable=unused-import
from tasks import openmoe  # noqa: F401  pylint: disable=unused-import


def register_all() -> None:
  """Registers everything again if someone reset the seqio registries (idempotent)."""
  builtin.register()
  builtin_eval.register()
  downstream.register()
  openmoe.register()
