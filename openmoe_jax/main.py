"""Old path of the `openmoe-train` command (`openmoe_jax.commands.train`), kept for
`python -m openmoe_jax.main`; imported, it is that module."""
import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("openmoe_jax.commands.train").main())
else:
  sys.modules[__name__] = importlib.import_module("openmoe_jax.commands.train")
