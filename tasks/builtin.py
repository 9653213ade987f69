"""Built-in corpus tasks: the stdlib's sources and docstrings, no download needed.

Tasks: `builtin_corpus_{ul2,full_lm}` (whole `.py` files: code plus docstrings) and
`builtin_docstrings_{ul2,full_lm}` (the English docstrings only). Mixtures, shaped like
OpenMoE's code + text mix: `builtin_mix` (UL2, the quick start) and `builtin_mix_full_lm`, with
code at 52.25% as in `mix_ul2`. Vocabulary: the shipped 7892-piece model + 300 sentinels
(`openmoe_jax.vocab.builtin_vocabulary`, 8192 ids).
"""
from openmoe_jax.data import vocab
from tasks import common
from tasks import sources

CODE_SHARE = 52.25  # mix_ul2's code percentage (Stack + GitHub): XueFuzhao/text-to-text-transfer-transformer `t5/data/mixtures.py`
MIXTURES = {"builtin_mix": "ul2", "builtin_mix_full_lm": "full_lm"}


def register() -> None:
  """Registers the built-in tasks and mixtures (idempotent; files are read on first use)."""
  vocabulary = vocab.builtin_vocabulary()
  # Short quick-start rows (128 tokens) keep every target: T5's trailing EOS on each row (OpenMoE's
  # tasks) cost the quick start 0.24 nats of held-out loss at step 300 (docs/data.md).
  common.add_task_pair("builtin_corpus", lambda: sources.stdlib_source("source"), vocabulary,
                       full_lm_eos_after_trim=False)
  common.add_task_pair("builtin_docstrings", lambda: sources.stdlib_source("docstrings"),
                       vocabulary, full_lm_eos_after_trim=False)
  for mixture, objective in MIXTURES.items():
    common.add_mixture(mixture, [(f"builtin_corpus_{objective}", CODE_SHARE),
                                 (f"builtin_docstrings_{objective}", 100.0 - CODE_SHARE)])


register()
