"""The input pipeline: seqio tasks and mixtures into packed, sharded, resumable batches.

`pipeline` (task/mixture -> batches, iterator state), `ul2` (UL2 denoisers and full-LM),
`vocab` (vocabularies with OpenMoE's ids), `corpus` (the built-in corpus and its SentencePiece
model), `chat` (OpenMoE-Chat's prompt template).

The names of `pipeline` are kept here: this package is also the old `openmoe_jax.data` module's
import path.
"""
import importlib as _importlib


def __getattr__(name):
  # Loaded on first use, so `import openmoe_jax.data.config`-style imports stay light.
  if name.startswith("__"):
    raise AttributeError(name)
  try:
    return getattr(_importlib.import_module("openmoe_jax.data.pipeline"), name)
  except AttributeError:
    raise AttributeError(f"module 'openmoe_jax.data' has no attribute {name!r}") from None


def __dir__():
  return sorted(set(globals()) | set(dir(_importlib.import_module("openmoe_jax.data.pipeline"))))
