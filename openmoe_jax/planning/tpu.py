"""TPU slices without a TPU: accelerator types, per-generation limits, compile-only devices.

libtpu (`pip install openmoe_jax[tpu]`) contains the XLA:TPU compiler. On any machine, with the
CPU as JAX's default backend, `jax.experimental.topologies.get_topology_desc` gives the devices
of a TPU slice that programs can be compiled for (not run on); `planning/plan.py` compiles the
training step for them.

Accelerator types are the names `gcloud` and `launch/tpu_vm.py` use (Cloud TPU docs, "TPU
versions" / "System architecture", https://cloud.google.com/tpu/docs/system-architecture-tpu-vm
and the per-version pages /tpu/docs/v2, v3, v4, v5e, v5p, v6e):
  * v2-N, v3-N, v4-N, v5p-N: N counts TensorCores, 2 per chip (v3-256 = 128 chips);
  * v5litepod-N, v6e-N: N counts chips, 1 TensorCore each.
One JAX device is one TensorCore on v2/v3, one chip on v5e/v6e, and one chip (megacore: both
cores as one device) on v5p. v4 runs in megacore mode on a real slice too, but libtpu's
compile-only v4 topology has one device per TensorCore; v4 plans are therefore per TensorCore
(16 GiB, half a chip's FLOP/s), with N devices for v4-N.
A raw libtpu topology name ("v4:4x4x4", "v3:8x16": chips per torus dimension) is accepted too.
"""
import dataclasses
import glob
import importlib.util
import math
import os
import re
import sys

from openmoe_jax.errors import UsageError

GIB = 2**30

# Per JAX device: (HBM bytes, peak bf16 FLOP/s, HBM bytes/s, devices per chip, topology dims,
# max chips). Source: Cloud TPU docs (above), per chip: v2 16 GiB / 45 TFLOP/s / 700 GB/s,
# v3 32 GiB / 123 TFLOP/s / 900 GB/s, v4 32 GiB / 275 TFLOP/s / 1200 GB/s, v5e 16 GiB /
# 197 TFLOP/s / 819 GB/s, v5p 95 GiB / 459 TFLOP/s / 2765 GB/s, v6e 32 GiB / 918 TFLOP/s /
# 1640 GB/s; v2/v3 (and v4 here, see above) split a chip into 2 devices.
GENERATIONS = {
    "v2": (8 * GIB, 22.5e12, 350e9, 2, 2, 256),
    "v3": (16 * GIB, 61.5e12, 450e9, 2, 2, 1024),
    "v4": (16 * GIB, 137.5e12, 600e9, 2, 3, 2048),
    "v5p": (95 * GIB, 459e12, 2765e9, 1, 3, 8960),
    "v5litepod": (16 * GIB, 197e12, 819e9, 1, 2, 256),
    "v6e": (32 * GIB, 918e12, 1640e9, 1, 2, 256),
}
# libtpu's names for the generations in topology strings.
_TOPOLOGY_PREFIX = {"v2": "v2", "v3": "v3", "v4": "v4", "v5p": "v5p", "v5litepod": "v5e",
                    "v6e": "v6e"}
_PREFIX_TO_GENERATION = {**{v: k for k, v in _TOPOLOGY_PREFIX.items()}, "v5": "v5p"}
EXTRA_HINT = "pip install 'openmoe_jax[tpu]'"


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice as the compiler sees it."""
  name: str                      # as given: "v3-256" or "v4:4x4x4"
  generation: str                # key of GENERATIONS
  topology: str                  # libtpu topology name, e.g. "v3:8x16"
  num_devices: int
  hbm_bytes_per_device: int
  peak_flops_per_device: float   # bf16
  hbm_bandwidth_per_device: float  # bytes/s


def _chip_grid(chips: int, dims: int) -> str:
  """Torus shape of a slice of `chips` chips, as Cloud TPU builds them (2x2 / 8x16 / 4x4x8)."""
  k = int(math.log2(chips))
  if dims == 2:
    x = 2 ** (k // 2)
    return f"{x}x{chips // x}"
  if chips == 4:
    return "2x2x1"
  exps = [k // 3 + (1 if i >= 3 - k % 3 else 0) for i in range(3)]
  return "x".join(str(2**e) for e in exps)


def parse_slice(name: str) -> Slice:
  """'v3-256', 'v5litepod-16', 'v6e-64' or a raw topology 'v4:4x4x4' -> Slice (UsageError)."""
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  m = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", name)
  if m and m.group(1) in GENERATIONS:
    gen, n = m.group(1), int(m.group(2))
    hbm, flops, bw, per_chip, dims, max_chips = GENERATIONS[gen]
    cores_per_chip = 2 if gen in ("v2", "v3", "v4", "v5p") else 1  # N counts these
    chips = n // cores_per_chip
    # Compile-only topologies start at one host's chips (2x2): libtpu rejects smaller ones.
    if n % cores_per_chip or chips < 4 or chips & (chips - 1) or chips > max_chips:
      raise UsageError(f"--tpu={name}: not a {gen} slice size (N counts "
                       f"{'TensorCores' if cores_per_chip == 2 else 'chips'}; e.g. {gen}-"
                       f"{8 if cores_per_chip == 2 else 4})")
    topology = f"{_TOPOLOGY_PREFIX[gen]}:{_chip_grid(chips, dims)}"
    return Slice(name, gen, topology, chips * per_chip, hbm, flops, bw)
  m = re.fullmatch(r"(v[0-9a-z]+):([0-9]+(?:x[0-9]+){1,2})", name)
  if m and m.group(1) in _PREFIX_TO_GENERATION:
    gen = _PREFIX_TO_GENERATION[m.group(1)]
    hbm, flops, bw, per_chip, dims, _ = GENERATIONS[gen]
    grid = [int(v) for v in m.group(2).split("x")]
    if len(grid) != dims:
      raise UsageError(f"--tpu={name}: a {gen} topology has {dims} dimensions")
    return Slice(name, gen, f"{_TOPOLOGY_PREFIX[gen]}:{m.group(2)}", math.prod(grid) * per_chip,
                 hbm, flops, bw)
  raise UsageError(f"--tpu={name}: unknown accelerator type; use a Cloud TPU type ({known}, "
                   f"e.g. v3-256) or a topology such as v4:4x4x4")


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_attached() -> bool:
  """A TPU chip on this machine's PCI bus (Google's vendor id 0x1ae0, as jax's own
  `hardware_utils` checks) or a TPU device file."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_cpu_default(environ=os.environ) -> None:
  """With libtpu installed on a machine without a TPU, JAX's backend search starts libtpu,
  which prints a screen of start-up errors: default JAX_PLATFORMS to cpu there (unset only;
  a CUDA plugin keeps the default search)."""
  if environ.get("JAX_PLATFORMS") is not None or not libtpu_installed():
    return
  cuda = any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  if not cuda and not tpu_attached():
    environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config has read the environment
      try:
        sys.modules["jax"].config.update("jax_platforms", "cpu")
      except (RuntimeError, AttributeError):  # a backend is up already: too late, leave it
        pass


def compile_host(s: Slice) -> list:
  """Keeps JAX's default backend on the CPU (call before any JAX computation); the TPU devices
  come from `slice_devices`. libtpu is told what it would otherwise look up on a TPU VM's
  metadata server (and print a screen of errors about), and that compile-only use needs no
  exclusive lock on TPU hardware. Returns the environment variables it set (the caller may
  remove them when done: `restore_environment`)."""
  import jax
  if not libtpu_installed():
    raise UsageError(f"--tpu needs libtpu, the XLA:TPU compiler: {EXTRA_HINT}")
  added = []
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", accelerator_type(s)),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    if key not in os.environ:
      os.environ[key] = value
      added.append(key)
  if jax.config.jax_platforms != "cpu":
    try:
      jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # a backend is up already (a test process, a notebook): fine if CPU
      if jax.default_backend() != "cpu":
        restore_environment(added)
        raise UsageError("--tpu plans from a CPU host: start with JAX_PLATFORMS=cpu") from None
  return added


def restore_environment(added) -> None:
  """Removes the variables `compile_host` set, so that later code in the process (a training
  run, `jax.distributed`'s TPU detection) does not take this machine for a TPU worker."""
  for key in added:
    os.environ.pop(key, None)


def accelerator_type(s: Slice) -> str:
  """The Cloud TPU type name of a slice (v3-256), also for raw topologies."""
  per_chip_n = 2 if s.generation in ("v2", "v3", "v4", "v5p") else 1
  chips = s.num_devices // GENERATIONS[s.generation][3]
  return f"{s.generation}-{chips * per_chip_n}"


def slice_devices(s: Slice):
  """Compile-only devices of the slice (libtpu)."""
  from jax.experimental import topologies
  if not libtpu_installed():
    raise UsageError(f"--tpu needs libtpu, the XLA:TPU compiler: {EXTRA_HINT}")
  devices = topologies.get_topology_desc(platform="tpu", topology_name=s.topology).devices
  if len(devices) != s.num_devices:
    raise UsageError(f"--tpu={s.name}: libtpu gave {len(devices)} devices for {s.topology}, "
                     f"expected {s.num_devices}")
  return devices
