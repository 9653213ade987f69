"""openmoe_jax: OpenMoE-style Mixture-of-Experts pretraining in JAX/Flax."""
__version__ = "0.1.0"
