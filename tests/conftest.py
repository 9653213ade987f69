"""Test setup: 8 fake CPU devices, set before JAX initialises its backend."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed (the [tpu] extra): no TPU search
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# JAX's persistent compilation cache, one folder per test run, shared by the xdist workers and
# the commands tests start in subprocesses (they inherit the environment): programs that
# several tests compile the same way are compiled once. Set before the workers start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _CACHE = tempfile.mkdtemp(prefix="openmoe-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")
