"""How a run starts from its MODEL_DIR: the lock, damaged steps set aside, the newest checkpoint
that reads, or another run's parameters (fine-tuning).
"""
import logging
import re
import sys
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.training import expert_bias
from openmoe_jax.errors import TrainingError, UsageError, error_line
from openmoe_jax.training.run_lock import RunLock


def acquire_lock(model_dir: str, say) -> Optional[RunLock]:
  """Process 0 takes MODEL_DIR's lock; every process fails alike when another run holds it."""
  lock, error, note = None, "", None
  if jax.process_index() == 0:
    lock = RunLock(model_dir)
    try:
      note = lock.acquire()
    except UsageError as e:
      error = str(e)
  errors = ckpt_lib.allgather_json(error)
  if errors[0]:
    raise UsageError(errors[0])
  if note:
    say(note)
  return lock


def set_aside_incomplete(model_dir: str, say) -> None:
  """Moves step folders that are not complete checkpoints, and the temporary folders of saves
  that never finished, out of the way of saves (said, one line each; nothing is deleted). The
  caller holds MODEL_DIR's lock, so no save of another process is under way."""
  if jax.process_index() == 0:
    for s in ckpt_lib.incomplete_steps(model_dir):
      where = ckpt_lib.set_aside(model_dir, s, "incomplete")
      say(f"checkpoint {s} is incomplete (an interrupted save or copy): not used, "
                 f"moved to {where}")
    for name in ckpt_lib.unfinished_saves(model_dir):
      where = ckpt_lib.set_aside(model_dir, name, "unfinished")
      say(f"{name} is the temporary folder of a save that never finished: not used, moved "
          f"to {where} (delete it to free the space)")
  ckpt_lib.allgather_json(0)  # every process waits for the moves


def restore_newest(model_dir: str, abstract, keep_checkpoints: int, say):
  """(Checkpointer, state, data state, step) of the newest checkpoint that reads, or None.

  Checkpoints newer than it that fail to read are moved to checkpoints_set_aside/ (one line
  each); if none reads, nothing is moved and the error names the newest failure.
  """
  available = ckpt_lib.list_steps(model_dir)
  failed = []
  for s in reversed(available):
    ckpt = ckpt_lib.Checkpointer(model_dir, max_to_keep=keep_checkpoints)
    try:
      state, data_state = ckpt.restore(s, abstract)
    except Exception as e:  # pylint: disable=broad-except  (any damage: try the next older)
      quiet_failed_reads()
      ckpt.close()
      failed.append((s, short_error(e)))
      continue
    if failed:
      ckpt.close()  # reopened below, after the damaged steps are out of its listing
      if jax.process_index() == 0:
        for bad, why in failed:
          where = ckpt_lib.set_aside(model_dir, bad, "unreadable")
          say(f"checkpoint {bad} could not be read ({why}): skipped, moved to {where}; "
                     f"resuming from checkpoint {s}")
      ckpt_lib.allgather_json(0)
      ckpt = ckpt_lib.Checkpointer(model_dir, max_to_keep=keep_checkpoints)
    return ckpt, state, data_state, s
  if failed:
    s, why = failed[0]
    raise TrainingError(f"no checkpoint in {ckpt_lib.checkpoint_dir(model_dir)} could be read "
                        f"(newest, step {s}: {why}); nothing was changed")
  return None


def read_newest(model_dir: str, read: Callable[[int], Any], say) -> Tuple[Any, int]:
  """(read(step), step) of the newest complete checkpoint `read` succeeds on: the fallback of
  the tools that only read a MODEL_DIR (openmoe-eval, -score, -infer, -export). Each newer
  checkpoint that fails is said in one line, as a resume says it, and left where it is (a
  read-only tool moves nothing); UsageError when none reads."""
  available = ckpt_lib.list_steps(model_dir)
  if not available:
    raise UsageError(f"no complete checkpoint in {model_dir}")
  failed = []
  for s in reversed(available):
    try:
      value = read(s)
    except Exception as e:  # pylint: disable=broad-except  (any damage: try the next older)
      quiet_failed_reads()
      failed.append((s, short_error(e)))
      continue
    for bad, why in failed:
      say(f"checkpoint {bad} could not be read ({why}): skipped; using checkpoint {s}")
    return value, s
  s, why = failed[0]
  raise UsageError(f"no checkpoint in {ckpt_lib.checkpoint_dir(model_dir)} could be read "
                   f"(newest, step {s}: {why})")


class _FailedReadTasks(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" reports of orbax's sibling reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
      return True
    value, tb = (record.exc_info or (None, None, None))[1:]
    return not (_read_leftover(value, tb) or "orbax" in record.getMessage())


def quiet_failed_reads() -> None:
  """Keeps the leftovers of a failed checkpoint read off the terminal.

  When one array of a damaged checkpoint fails to read, orbax closes its event loop while
  TensorStore still reads the others: each of those reads later reports "Event loop is closed"
  as an unraisable exception from a TensorStore thread, the read coroutines still running are
  closed with their errors never awaited, and asyncio logs the read tasks whose exceptions
  nobody retrieved, each with a full traceback (thousands of lines, at any later time). The
  failure is already said in one line; only these leftovers are dropped.
  """
  log = logging.getLogger("asyncio")
  if not any(isinstance(f, _FailedReadTasks) for f in log.filters):
    log.addFilter(_FailedReadTasks())
  previous = sys.unraisablehook
  if not getattr(previous, "drops_closed_loop", False):
    def hook(unraisable):
      if not _read_leftover(unraisable.exc_value, unraisable.exc_traceback):
        previous(unraisable)
    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def _read_leftover(value, tb) -> bool:
  """A closed-loop callback, an orbax read coroutine closed with its error never awaited, or a
  TensorStore read future's error (asyncio wraps those in a task of its own, `_wrap_awaitable`,
  so no orbax frame is in their traceback; the message says what failed)."""
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  if value is not None and _TENSORSTORE_READ.match(str(value)):
    return True
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/"):
      return True
    tb = tb.tb_next
  return False


# TensorStore's absl-status errors of a read: 'OUT_OF_RANGE: Error reading "k" in OCDBT ...'.
_TENSORSTORE_READ = re.compile(r"^[A-Z_]+: Error reading .* in (OCDBT database|local file)")


def short_error(e: BaseException) -> str:
  """One line for a restore failure: the innermost cause's first line."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  return f"{type(e).__name__}: {error_line(e)}"[:300]


def init_from(source_dir: str, tx, abstract, state_sh, mesh):
  """Fresh optimizer state around the parameters of another run's latest checkpoint."""
  steps_there = ckpt_lib.list_steps(source_dir)
  if not steps_there:
    raise UsageError(f"initial checkpoint: no complete checkpoint in {source_dir}")
  loaded = ckpt_lib.restore_params(source_dir, steps_there[-1])
  want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract["params"])
  got = jax.tree.map(lambda a: (a.shape, a.dtype), loaded)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise UsageError(f"initial checkpoint in {source_dir} does not match the model gin")
  params = jax.tree.map(lambda a, s: jax.device_put(a, s), loaded, state_sh["params"])
  with jax.set_mesh(mesh):
    opt_state = jax.jit(lambda ps: tx.init(expert_bias.trainable(ps)),
                        out_shardings=state_sh["opt_state"])(params)
  step = jax.device_put(jnp.int32(steps_there[-1]), state_sh["step"])
  return {"step": step, "params": params, "opt_state": opt_state}


def update_count(opt_state, default: int) -> int:
  """The optimizer's update count (the `count` of optax's and our Adafactor's states)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if path and getattr(path[-1], "name", None) == "count":
      return int(jax.device_get(leaf))
  return default
