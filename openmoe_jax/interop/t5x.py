"""OpenMoE's own t5x checkpoints: read one into our parameter tree, write ours as one.

The format is t5x's (XueFuzhao/t5x `t5x/checkpoints.py`, `Checkpointer.save` / `restore`), in
which OpenMoE (arXiv:2402.01739) released its JAX weights:

    checkpoint_<step>/checkpoint          msgpack (flax.serialization) of
                                          {'version': 3, 'optimizer': {'target': params,
                                           'state': {'step': ..., 'param_states': ...}}}
    checkpoint_<step>/target.<a>.<b>...   one zarr array per parameter (tensorstore, gzip)

A leaf of the msgpack tree is either the array itself (written inline: t5x does so for arrays
without partitioning axes, e.g. the step) or the JSON of the array's `tensorstore.Spec`
(`_get_spec`: driver 'zarr', kvstore path `name.replace('/', '.')` relative to the checkpoint
folder, metadata with shape, chunks and compressor). Parameter paths are flaxformer's, the ones
this project uses (`decoder/layers_3/mlp/expert/wi_0/kernel`, ...). Arrays are read and written
one at a time. Errors are `UsageError` with a one-line message.
"""
import os
from typing import Iterator, Optional, Tuple

import numpy as np
from openmoe_jax.errors import UsageError


VERSION = 3  # t5x checkpoints.VERSION
MSGPACK = "checkpoint"
_DESIRED_CHUNK_SIZE_BYTES = 64 * 1024 * 1024  # t5x checkpoints._DESIRED_CHUNK_SIZE_BYTES


def _fail(msg):
  raise UsageError(msg)


def _is_spec(node) -> bool:
  return isinstance(node, dict) and {"driver", "kvstore"} <= set(node)


# ------------------------------------------------------------------------------------- reading
def msgpack_path(path: str) -> Tuple[str, str]:
  """(checkpoint folder, msgpack file) for a checkpoint_<step> folder, its `state/` layout, or
  the msgpack file itself (as t5x `Checkpointer.restore(path=...)` accepts them)."""
  if os.path.isfile(path):
    return os.path.dirname(os.path.abspath(path)), path
  if not os.path.isdir(path):
    _fail(f"t5x checkpoint not found: {path}")
  for candidate in (os.path.join(path, "state", MSGPACK), os.path.join(path, MSGPACK)):
    if os.path.isfile(candidate):
      return path, candidate
  steps = sorted(n for n in os.listdir(path) if n.startswith("checkpoint_") and ".tmp" not in n)
  hint = f" (a t5x model dir? pass one of {', '.join(steps[-3:])})" if steps else ""
  _fail(f"{path} is not a t5x checkpoint: no '{MSGPACK}' msgpack file{hint}")


def read_state(path: str) -> Tuple[str, dict]:
  """(checkpoint folder, the msgpack state {'version', 'optimizer': {'target', 'state'}})."""
  from flax import serialization
  folder, file = msgpack_path(path)
  with open(file, "rb") as f:
    data = f.read()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for a truncated or foreign file
    _fail(f"{file} is not a t5x checkpoint msgpack file ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else 'unreadable'})")
  if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict) \
     or not isinstance(state["optimizer"].get("target"), dict):
    _fail(f"{file} is not a t5x checkpoint: no 'optimizer/target' parameter tree")
  return folder, state


def flatten(tree, prefix=()) -> dict:
  """{path tuple: leaf} with tensorstore spec dicts as leaves."""
  out = {}
  for key, node in tree.items():
    path = prefix + (key,)
    if isinstance(node, dict) and not _is_spec(node):
      out.update(flatten(node, path))
    else:
      out[path] = node
  return out


def leaf_shape(leaf) -> tuple:
  if _is_spec(leaf):
    meta = leaf.get("metadata", {})
    if "shape" not in meta:
      _fail(f"tensorstore spec without metadata.shape: {leaf}")
    return tuple(int(n) for n in meta["shape"])
  return tuple(np.shape(leaf))


def _absolute_spec(folder: str, spec: dict) -> dict:
  """t5x `_update_ts_path_from_relative_to_absolute` (and `_maybe_update_ts_from_gcs_to_file`
  for a checkpoint copied off GCS): paths are relative to the checkpoint folder."""
  spec = dict(spec)
  kvstore = dict(spec.get("kvstore", {}))
  if kvstore.get("driver") == "gcs":
    kvstore = {"driver": "file", "path": spec.pop("path", kvstore.get("path", ""))}
  if "path" in kvstore:
    kvstore["path"] = os.path.join(folder, kvstore["path"])
  elif "path" in spec:  # tensorstore < 0.1.14 layout
    spec["path"] = os.path.join(folder, spec["path"])
  else:
    _fail(f"tensorstore spec without a path: {spec}")
  if kvstore.get("driver") == "gfile":
    kvstore["driver"] = "file"
  spec["kvstore"] = kvstore
  return spec


def read_leaf(folder: str, name: str, leaf) -> np.ndarray:
  """The array of one msgpack leaf (inline, or read from its zarr folder with tensorstore)."""
  if not _is_spec(leaf):
    return np.asarray(leaf)
  import tensorstore as ts
  try:
    store = ts.open(_absolute_spec(folder, leaf), open=True, read=True).result()
    return np.asarray(store.read().result())
  except Exception as e:  # tensorstore: ValueError for missing/short chunks, and others
    _fail(f"{name}: cannot read its array in {folder} ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200]})")


def step_of(state: dict, folder: str) -> int:
  step = state["optimizer"].get("state", {}).get("step")
  if step is not None and not _is_spec(step):
    return int(np.asarray(step))
  base = os.path.basename(os.path.normpath(folder))
  return int(base.split("_")[-1]) if base.startswith("checkpoint_") and \
      base.split("_")[-1].isdigit() else 0


def load_params(path: str, want: dict, dtype=None) -> Tuple[dict, int]:
  """(flat params {path tuple: numpy array}, step) from a t5x checkpoint.

  want: {path tuple: ShapeDtypeStruct} of the model (the gin's shapes). Every parameter must be
  there with its shape, and no other: missing, extra or misshapen parameters fail in one line
  before any array is read. The optimizer state ('state/param_states') is not read.
  """
  folder, state = read_state(path)
  have = flatten(state["optimizer"]["target"])
  missing = sorted("/".join(p) for p in set(want) - set(have))
  if missing:
    _fail(f"t5x checkpoint {folder} lacks parameter {missing[0]}"
          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
          + " (another model? check the model gin)")
  extra = sorted("/".join(p) for p in set(have) - set(want))
  if extra:
    _fail(f"t5x checkpoint {folder} has parameter {extra[0]} that the model gin does not"
          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  for p, spec in want.items():
    if leaf_shape(have[p]) != tuple(spec.shape):
      _fail(f"{'/'.join(p)}: shape {leaf_shape(have[p])} in {folder}, the model gin wants "
            f"{tuple(spec.shape)} (another model size?)")
  flat = {}
  for p, spec in want.items():
    name = "/".join(p)
    array = read_leaf(folder, name, have[p])
    if array.shape != tuple(spec.shape):  # an inline array shorter than its spec says
      _fail(f"{name}: read shape {array.shape}, expected {tuple(spec.shape)} (truncated?)")
    flat[p] = np.ascontiguousarray(array.astype(dtype or spec.dtype, copy=False))
  return flat, step_of(state, folder)


ADAFACTOR_FIELDS = ("v_row", "v_col", "v", "m")  # t5x adafactor._AdafactorParamState


def load_adafactor_state(path: str, fresh) -> dict:
  """t5x Adafactor slots ('state/param_states/<param>/{v_row,v_col,v,m}') in the layout of our
  fresh `optimizer.AdafactorState` (the same fields, per parameter): {field: flat {path: array}}
  plus 'count' (the t5x step). Every slot must exist with our shape (t5x factored the same dims)."""
  folder, state = read_state(path)
  slots = state["optimizer"].get("state", {}).get("param_states")
  if not isinstance(slots, dict):
    _fail(f"t5x checkpoint {folder} has no optimizer state ('state/param_states')")
  from flax import traverse_util
  have = flatten(slots)
  out = {"count": np.int32(step_of(state, folder))}
  for field in ADAFACTOR_FIELDS:
    flat = {}
    for p, spec in traverse_util.flatten_dict(getattr(fresh, field)).items():
      name = "/".join(p + (field,))
      if p + (field,) not in have:
        _fail(f"t5x checkpoint {folder} lacks optimizer state param_states/{name}")
      if leaf_shape(have[p + (field,)]) != tuple(spec.shape):
        _fail(f"optimizer state param_states/{name}: shape {leaf_shape(have[p + (field,)])} in "
              f"{folder}, ours is {tuple(spec.shape)} (factored differently?)")
      flat[p] = read_leaf(folder, name, have[p + (field,)]).astype(spec.dtype)
    out[field] = flat
  return out


# ------------------------------------------------------------------------------------- writing
def choose_chunk_shape(write_shape, target_elements: int) -> list:
  """t5x `_choose_chunk_shape`: the largest chunk dividing write_shape with at most
  target_elements elements, shrinking the largest dimension first."""
  factors = [[i for i in range(1, size + 1) if size % i == 0] for size in write_shape]
  while int(np.prod([f[-1] for f in factors])) > target_elements:
    largest = max(range(len(factors)), key=lambda i: (factors[i][-1], -i))
    factors[largest].pop()
  return [f[-1] for f in factors]


def array_spec(name: str, shape, dtype: str) -> dict:
  """t5x `_get_spec` for a local folder, with the metadata `_get_param_info` writes."""
  itemsize = np.dtype(np.float32 if dtype == "float32" else np.uint16).itemsize
  chunks = choose_chunk_shape(shape, max(_DESIRED_CHUNK_SIZE_BYTES // itemsize, 1))
  return {"driver": "zarr", "dtype": dtype,
          "kvstore": {"driver": "file", "path": name.replace("/", ".")},
          "metadata": {"compressor": {"id": "gzip"}, "shape": [int(n) for n in shape],
                       "chunks": [int(n) for n in chunks]}}


def write_checkpoint(folder: str, step: int, arrays: Iterator[Tuple[tuple, np.ndarray]],
                     dtype: str = "float32") -> int:
  """Writes FOLDER (a t5x checkpoint_<step> folder, which must not exist yet) from (path, array)
  pairs, one array in memory at a time; the msgpack file last. Returns the array count.

  The optimizer state is not written: t5x restores such a checkpoint for training with
  `RestoreCheckpointConfig(strict=False)`, starting the optimizer state fresh.
  """
  import jax.numpy as jnp
  import tensorstore as ts
  from flax import serialization, traverse_util
  os.makedirs(folder)
  specs = {}
  for path, array in arrays:
    name = "target/" + "/".join(path)
    spec = array_spec(name, array.shape, dtype)
    absolute = _absolute_spec(folder, spec)
    store = ts.open(absolute, create=True, open=True).result()
    store.write(np.asarray(array).astype(jnp.dtype(dtype))).result()
    specs[path] = ts.Spec(spec).to_json()  # t5x stores the relative spec's JSON
  state = {"version": VERSION,
           "optimizer": {"target": traverse_util.unflatten_dict(specs),
                         "state": {"step": np.asarray(step, np.int32)}}}
  with open(os.path.join(folder, MSGPACK), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return len(specs)


def checkpoint_name(step: Optional[int]) -> str:
  return f"checkpoint_{int(step or 0)}"
