"""Old path of `openmoe-eval` (`openmoe_jax.commands.evaluate`), kept for users and gin files
(`import openmoe_jax.evaluate` registers `openmoe_jax.evaluate.evaluate_checkpoint`)."""
import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("openmoe_jax.commands.evaluate").main())
else:
  sys.modules[__name__] = importlib.import_module("openmoe_jax.commands.evaluate")
