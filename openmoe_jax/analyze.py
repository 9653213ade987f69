"""Old path of the `openmoe-analyze` command (`openmoe_jax.commands.analyze`), kept for
`python -m openmoe_jax.analyze`; imported, it is that module."""
import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("openmoe_jax.commands.analyze").main())
else:
  sys.modules[__name__] = importlib.import_module("openmoe_jax.commands.analyze")
