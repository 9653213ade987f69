"""Old path of the `python -m openmoe_jax.inspect_data` command (`openmoe_jax.commands.inspect_data`), kept for
`python -m openmoe_jax.inspect_data`; imported, it is that module."""
import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("openmoe_jax.commands.inspect_data").main())
else:
  sys.modules[__name__] = importlib.import_module("openmoe_jax.commands.inspect_data")
