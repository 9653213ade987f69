"""Old import path of `openmoe_jax.training.loop`, kept for users (the same module object).
Importing it also registers the gin configurable `train`, as it did (gin files may import it)."""
import importlib
import sys

importlib.import_module("openmoe_jax.commands.configurables")
sys.modules[__name__] = importlib.import_module("openmoe_jax.training.loop")
