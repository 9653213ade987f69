"""Old import path of `openmoe_jax.interop.hf_export`, kept for users (the same module object)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("openmoe_jax.interop.hf_export")
