"""Old path of the `python -m openmoe_jax.baselines` command (`openmoe_jax.commands.baselines`), kept for
`python -m openmoe_jax.baselines`; imported, it is that module."""
import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("openmoe_jax.commands.baselines").main())
else:
  sys.modules[__name__] = importlib.import_module("openmoe_jax.commands.baselines")
