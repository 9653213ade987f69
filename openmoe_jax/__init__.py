"""openmoe_jax: OpenMoE-style Mixture-of-Experts pretraining in JAX/Flax.

Subpackages, by what they are for: `model`, `data` (the input pipeline), `training`,
`evaluation` (with decoding), `interop` (Hugging Face, t5x), `planning` (TPU plans) and
`commands` (the `openmoe-*` tools). `errors`, `fs` and `gin_utils` are shared by all of them.
Importing the package changes nothing in JAX or the environment; the commands set what they
need. The other top-level modules are old import paths, kept as aliases of their new modules.
"""
__version__ = "0.1.0"
