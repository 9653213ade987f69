"""The platform a program is traced for: JAX's default backend, or the compile-only target set
by `compiling_for` (the TPU plan traces on a CPU host for TPU devices).

Choices that depend on the hardware (`GROUPED_MATMUL='auto'`, Pallas interpret mode) read
`platform()`, so a TPU plan compiles the program a TPU run would. (`DISPATCH='auto'` is
'gather' on every platform.)
"""
import contextlib
import threading

_state = threading.local()


def platform() -> str:
  """'tpu', 'gpu' or 'cpu'."""
  forced = getattr(_state, "platform", None)
  if forced:
    return forced
  import jax
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def tpu_generation():
  """'v3', 'v4', 'v5p', ... of the TPU a program is traced for (the compile-only target's, or
  the attached chips'), None when unknown or not a TPU."""
  if platform() != "tpu":
    return None
  forced = getattr(_state, "generation", None)
  if forced:
    return forced
  import re
  import jax
  m = re.search(r"v(\d+)\s*(lite|p|e)?", jax.devices()[0].device_kind.lower())
  if not m:
    return None
  suffix = {"lite": "e", "p": "p", "e": "e"}.get(m.group(2) or "", "")
  return f"v{m.group(1)}{suffix}"


@contextlib.contextmanager
def compiling_for(name: str, generation=None):
  """Within the block, `platform()` is `name` (and `tpu_generation()` is `generation`)."""
  before = getattr(_state, "platform", None), getattr(_state, "generation", None)
  _state.platform, _state.generation = name, generation
  try:
    yield
  finally:
    _state.platform, _state.generation = before
