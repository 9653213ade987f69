"""Orbax checkpoints of a training run, under MODEL_DIR/checkpoints/<step>/{state,data}.

`state` is the train-state pytree (sharded jax.Arrays; restored onto any mesh by passing target
shardings), `data` a JSON dict (the data iterator state; orbax writes it from process 0 only, so
multi-process callers gather every process's part first, `allgather_json`). When the input
pipeline can save its position, `data_positions/shard_<k>.tfdata` holds each data shard's saved
tf.data iterator, written by the process that reads the shard (as t5x saves its tf.data
iterators beside the train state), so a resume restores the input without replaying it. Orbax writes a step into a
`<step>.orbax-checkpoint-tmp*` directory and renames it (or, on object stores, records the
commit) only when complete, so a crash mid-save never touches an existing checkpoint.
"""
import dataclasses
import json
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from openmoe_jax import fs

STATE, DATA, POSITIONS = 'state', 'data', 'data_positions'
_STEP_METADATA = '_CHECKPOINT_METADATA'
SET_ASIDE_DIR = 'checkpoints_set_aside'


def checkpoint_dir(model_dir) -> epath.Path:
  # orbax needs absolute local paths; gs:// and other URLs are left alone.
  return epath.Path(fs.abspath(model_dir)) / 'checkpoints'


def _is_complete(step_dir: epath.Path) -> bool:
  # Tmp dirs never have a plain integer name. A final-named dir can still be incomplete on object
  # stores (no atomic rename) or after a partial copy, so also require orbax's commit record.
  try:
    meta = json.loads((step_dir / _STEP_METADATA).read_text())
  except (OSError, ValueError):
    return False
  return (meta.get('commit_timestamp_nsecs') is not None and
          all((step_dir / item).is_dir() for item in (STATE, DATA)))


def list_steps(model_dir) -> list[int]:
  """Sorted steps of the complete checkpoints in MODEL_DIR (tmp / uncommitted ones excluded)."""
  directory = checkpoint_dir(model_dir)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and _is_complete(p))


def incomplete_steps(model_dir) -> list[int]:
  """Steps whose folder has a final (integer) name but is not a complete checkpoint."""
  directory = checkpoint_dir(model_dir)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and not _is_complete(p))


def unfinished_saves(model_dir) -> list[str]:
  """Names of the temporary folders of saves that never finished (`<step>.orbax-checkpoint-tmp*`:
  a save killed before its rename)."""
  directory = checkpoint_dir(model_dir)
  if not directory.exists():
    return []
  return sorted(p.name for p in directory.iterdir()
                if p.is_dir() and '.orbax-checkpoint-tmp' in p.name)


def set_aside(model_dir, step, reason: str) -> str:
  """Moves checkpoint `step` (or a folder of checkpoints/ by name) to
  MODEL_DIR/checkpoints_set_aside/<step>-<reason>[-k]; returns the new location. Nothing is
  deleted: the folder is kept for the user."""
  src = str(checkpoint_dir(model_dir) / str(step))
  base = fs.join(fs.abspath(model_dir), SET_ASIDE_DIR, f'{step}-{reason}')
  dst, k = base, 1
  while fs.exists(dst):
    dst, k = f'{base}-{k}', k + 1
  fs.makedirs(fs.join(fs.abspath(model_dir), SET_ASIDE_DIR))
  fs.move_dir(src, dst)
  return dst


def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order (collective: all must call it).

  Used for the data position: orbax writes the `data` item from process 0 only, so each
  process's position must reach process 0 inside the same (atomic) checkpoint.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([mine.size], np.int32)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:mine.size] = mine
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _position_file(shard_index: int) -> str:
  return f'shard_{shard_index:05d}.tfdata'


class _PositionsHandler(ocp.AsyncCheckpointHandler):
  """Writes the data positions of this process's shards (every process writes its own files).
  They are read back with `read_positions`, for the shards the resuming process reads."""

  @staticmethod
  def _write(directory: epath.Path, shards: Mapping[int, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, blob in shards.items():
      (directory / _position_file(int(index))).write_bytes(blob)

  async def async_save(self, directory: epath.Path, args: 'PositionsSave'):
    from orbax.checkpoint import future  # pylint: disable=g-import-not-at-top

    async def write():
      self._write(directory, args.shards)
    return [future.CommitFutureAwaitingContractedSignals(write(), name='data_positions_save')]

  def save(self, directory: epath.Path, args: 'PositionsSave') -> None:
    self._write(directory, args.shards)

  def restore(self, directory: epath.Path, args=None) -> dict:
    del args
    return {int(p.name[6:11]): p.read_bytes() for p in directory.glob('shard_*.tfdata')}


@ocp.args.register_with_handler(_PositionsHandler, for_save=True)
@dataclasses.dataclass
class PositionsSave(ocp.args.CheckpointArgs):
  shards: Mapping[int, bytes]


@ocp.args.register_with_handler(_PositionsHandler, for_restore=True)
@dataclasses.dataclass
class PositionsRestore(ocp.args.CheckpointArgs):
  """orbax requires a restore type for every handler it manages (resume uses read_positions)."""


def read_positions(model_dir, step: int, shard_indices) -> Optional[dict]:
  """{shard index: saved tf.data position} of checkpoint `step`, or None when the checkpoint
  holds no position for one of these shards (its pipeline could not save one: replay)."""
  directory = checkpoint_dir(model_dir) / str(step) / POSITIONS
  files = {k: directory / _position_file(k) for k in shard_indices}
  if not all(f.exists() for f in files.values()):
    return None
  return {k: f.read_bytes() for k, f in files.items()}


class Checkpointer:
  """Async save / restore of (train state, data state) for one MODEL_DIR.

  The caller decides when to save (CHECKPOINT_PERIOD, end of training, SIGTERM). Use as a context
  manager or call `close()`; in multi-process runs every process makes the same calls.
  """

  def __init__(self, model_dir, *, max_to_keep: Optional[int] = 20, async_save: bool = True):
    """Opens (creating if needed) MODEL_DIR/checkpoints.

    Args:
      model_dir: run directory (local path or any URL etils.epath supports, e.g. gs://).
      max_to_keep: keep only the newest this many checkpoints (None: keep all). OpenMoE: 20.
      async_save: write in a background thread; `save` returns once arrays are copied to host.
    """
    self.directory = checkpoint_dir(model_dir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE, DATA, POSITIONS),
                                          options=options)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False,
           data_positions: Optional[Mapping[int, bytes]] = None) -> bool:
    """Starts saving `state` and the JSON-serialisable `data_state` as checkpoint `step`.

    Waits for the previous async save first. Old checkpoints beyond `max_to_keep` are deleted
    only after this one is committed.

    Args:
      step: training step of `state`.
      state: pytree of jax.Arrays / numpy arrays / scalars (e.g. params, opt state, step).
      data_state: JSON-serialisable dict, e.g. the data iterator position.
      force: passed to orbax: save even if its save policy would skip this step.
      data_positions: {shard index: saved tf.data iterator} of this process's data shards
        (collective: every process passes its own, or every process passes None).

    Returns:
      False if skipped because a checkpoint for this or a later step already exists.

    Raises:
      orbax.checkpoint.checkpoint_manager.StepAlreadyExistsError: force=True on an existing step
        (existing checkpoints are never overwritten).
    """
    items = {STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}
    if data_positions is not None:
      items[POSITIONS] = PositionsSave(dict(data_positions))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def all_steps(self) -> list[int]:
    return list_steps(self.directory.parent)

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None; in-flight saves are not visible."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: Optional[int], abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` (None: the latest) onto the shardings of `abstract_state`.

    Args:
      step: step to restore, or None for `latest_step()`.
      abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set (e.g. from
        `jax.eval_shape` plus the state shardings) matching the saved structure; the target
        mesh and specs may differ from the saving run's (orbax reshards on load).

    Returns:
      (state, data_state): state with the structure, dtypes and shardings of `abstract_state`.
    """
    step = self.latest_step() if step is None else step
    if step is None or not _is_complete(self.directory / str(step)):
      raise FileNotFoundError(f'No complete checkpoint for step {step} in {self.directory}.')
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                 DATA: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return restored[STATE], restored[DATA]

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight save (if any) is committed; re-raises its error."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ParamReader:
  """Reads the parameters of one checkpoint as host numpy arrays, one at a time or all at once.

  The structure comes from the checkpoint's own metadata (orbax partial restore), so neither the
  model nor the optimizer state is built; only the arrays asked for are read. Used by the tools
  (openmoe-eval, -score, -export, fine-tuning starts).
  """

  def __init__(self, model_dir, step: Optional[int] = None, params_key: str = 'params'):
    steps = list_steps(model_dir)
    step = (steps[-1] if steps else None) if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f'No complete checkpoint for step {step} in {model_dir}.')
    self.step = step
    self._path = checkpoint_dir(model_dir) / str(step) / STATE
    self._keys = tuple(params_key.split('/'))
    self._ckptr = ocp.PyTreeCheckpointer()
    tree = self._ckptr.metadata(self._path).item_metadata.tree
    for key in self._keys:
      if not isinstance(tree, dict) or key not in tree:
        raise KeyError(f'{params_key!r} not in the state saved at {self._path}.')
      tree = tree[key]
    self.meta = tree

  def spec(self, path: tuple):
    """(shape, numpy dtype) of the parameter at `path` (a tuple of names)."""
    node = self.meta
    for key in path:
      if not isinstance(node, dict) or key not in node:
        raise KeyError(f"checkpoint has no parameter {'/'.join(path)}")
      node = node[key]
    return tuple(node.shape), np.dtype(node.dtype)

  def _restore(self, target):
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    for key in reversed(self._keys):
      target, restore_args = {key: target}, {key: restore_args}
    out = self._ckptr.restore(self._path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    for key in self._keys:
      out = out[key]
    return out

  def read(self, path: tuple) -> np.ndarray:
    """One parameter, with its saved dtype (bfloat16 kept)."""
    target = jax.ShapeDtypeStruct(*self.spec(path))
    for key in reversed(path):
      target = {key: target}
    out = self._restore(target)
    for key in path:
      out = out[key]
    return out

  def read_all(self) -> Any:
    """The whole parameter tree (nested dicts of numpy arrays)."""
    return self._restore(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                      self.meta))

  def close(self) -> None:
    self._ckptr.close()

  def __enter__(self) -> 'ParamReader':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params(model_dir, step: Optional[int] = None, params_key: str = 'params') -> Any:
  """The parameters of checkpoint `step` (None: the latest complete one) as numpy arrays.

  Args:
    model_dir: run directory holding `checkpoints/`.
    step: step to read, or None for the latest complete one.
    params_key: '/'-separated path of the params subtree inside the saved state.

  Returns:
    The params subtree (nested dicts) of numpy arrays with their saved dtypes (bf16 kept).
  """
  with ParamReader(model_dir, step, params_key) as reader:
    return reader.read_all()
