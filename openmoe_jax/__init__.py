"""openmoe_jax: OpenMoE-style Mixture-of-Experts pretraining in JAX/Flax."""
__version__ = "0.1.0"

# libtpu (the [tpu] extra) on a machine without a TPU: keep JAX on the CPU, without libtpu's
# start-up errors (JAX_PLATFORMS, when set, wins).
from openmoe_jax import tpu as _tpu  # noqa: E402

_tpu.quiet_cpu_default()
