"""The model: OpenMoE's decoder-only ST-MoE transformer and its parts.

`config` (ModelConfig), `layers` (embeddings, attention, dense MLP, norms), `routing` (token-choice
top-k routing math), `moe` (the routed-experts sublayer), `ragged_dispatch`, `grouped` and
`pallas_grouped` (dispatch kernels), `transformer` (the decoder), `counts` (parameters and FLOPs),
`partitioning` (logical axes and the one table mapping them to the mesh).

`openmoe_jax.model.Transformer` and the other names of `transformer` are kept here: this package
is also the old `openmoe_jax.model` module's import path.
"""
import importlib as _importlib


def __getattr__(name):
  # Loaded on first use, so `import openmoe_jax.model.config`-style imports stay light.
  if name.startswith("__"):
    raise AttributeError(name)
  try:
    return getattr(_importlib.import_module("openmoe_jax.model.transformer"), name)
  except AttributeError:
    raise AttributeError(f"module 'openmoe_jax.model' has no attribute {name!r}") from None


def __dir__():
  return sorted(set(globals()) | set(dir(_importlib.import_module("openmoe_jax.model.transformer"))))
