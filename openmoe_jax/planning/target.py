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


@contextlib.contextmanager
def compiling_for(name: str):
  """Within the block, `platform()` is `name`."""
  before = getattr(_state, "platform", None)
  _state.platform = name
  try:
    yield
  finally:
    _state.platform = before
