"""Faults a user's run must survive: non-finite updates, a second trainer, damaged checkpoints,
late checks, signals and gin mistakes. Each fault is one line on stderr (the last one) and
never costs the user a good checkpoint.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from openmoe_jax import fs, gin_utils
from openmoe_jax.training import checkpoint
from openmoe_jax.training import console
from openmoe_jax.training import resume
from openmoe_jax.training import run_lock
from openmoe_jax.errors import TrainingError, UsageError

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.NUM_EMBEDDINGS=8192", "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
        "--gin.EVAL_PERIOD=0", "--gin.train.progress_bar=False", "--gin.train.log_period=1",
        "--gin.OPTIMIZER='adamw'"]
SANE = "--gin.OPTIMIZER_KWARGS={'base_learning_rate': 3e-3, 'warmup_steps': 1, 'decay_steps': 1000}"
# The same schedule (so the same optimizer state) with an infinite peak: the update of the first
# step after warmup makes every parameter non-finite while that step's loss is still finite.
INFINITE = "--gin.OPTIMIZER_KWARGS={'base_learning_rate': 1e999, 'warmup_steps': 1, 'decay_steps': 1000}"
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _cmd(model_dir, *extra):
  return [sys.executable, "-m", "openmoe_jax.main", *TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra]


def _run(model_dir, *extra, timeout=300):
  return subprocess.run(_cmd(model_dir, *extra), capture_output=True, text=True, timeout=timeout,
                        env=ENV, cwd=ROOT)


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


def _finite_checkpoints(d) -> dict:
  """{step: every parameter finite} for each complete checkpoint."""
  out = {}
  for s in checkpoint.list_steps(d):
    params = checkpoint.restore_params(d, s)
    out[s] = all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))
  return out


def _steps(d):
  return [json.loads(l)["step"] for l in open(d / "metrics.jsonl")]


@pytest.mark.slow
def test_a_non_finite_update_is_never_saved_and_the_rerun_recovers(tmp_path):
  d = tmp_path / "run"
  assert _run(d, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=1",
              "--gin.KEEP_CHECKPOINTS=3", SANE).returncode == 0
  r = _run(d, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1", "--gin.KEEP_CHECKPOINTS=3",
           INFINITE)
  assert r.returncode == 1, r.stderr[-2000:]
  last = _last_line(r.stderr)
  assert last.startswith("openmoe-train: the update of step 4 made the parameters")
  assert "the newest checkpoint, step 3, holds a finite state" in last
  assert _finite_checkpoints(d) == {1: True, 2: True, 3: True}  # none deleted, none poisoned
  r = _run(d, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1", "--gin.KEEP_CHECKPOINTS=3", SANE)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _finite_checkpoints(d) == {4: True, 5: True, 6: True}
  rows = [json.loads(l) for l in open(d / "metrics.jsonl")]
  assert all(np.isfinite(row["loss"]) for row in rows if row["step"] in (4, 5, 6))


@pytest.mark.slow
def test_fail_on_nan_false_skips_the_save_of_a_non_finite_state(tmp_path):
  d = tmp_path / "run"
  assert _run(d, "--gin.TRAIN_STEPS=1", "--gin.CHECKPOINT_PERIOD=1", SANE).returncode == 0
  r = _run(d, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=1", INFINITE,
           "--gin.train.fail_on_nan=False")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "checkpoint 2 not saved" in r.stderr and "checkpoint 3 not saved" in r.stderr
  assert _finite_checkpoints(d) == {1: True}


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_the_first_finishes_clean(tmp_path):
  d = tmp_path / "run"
  first = subprocess.Popen(_cmd(d, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000",
                                SANE), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (d / "metrics.jsonl").exists():
    time.sleep(0.5)
  r = _run(d, "--gin.TRAIN_STEPS=100000", SANE)
  assert first.poll() is None, "the first trainer must still be running"
  first.send_signal(signal.SIGTERM)
  assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
  assert r.returncode == 2, r.stderr[-2000:]
  assert _last_line(r.stderr).startswith("openmoe-train: error: MODEL_DIR is in use by another "
                                         f"openmoe-train (host {socket.gethostname()}, "
                                         f"pid {first.pid}, started ")
  steps = _steps(d)
  assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or repeated steps
  assert checkpoint.list_steps(d) == [steps[-1]]  # the first run's own save at SIGTERM
  assert not (d / run_lock.LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_stale_lock_incomplete_and_unreadable_steps_are_skipped(tmp_path):
  d = tmp_path / "run"
  assert _run(d, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=1", SANE).returncode == 0
  # A crashed run's lock (its pid no longer runs) ...
  dead = subprocess.Popen(["true"])
  dead.wait()
  (d / run_lock.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead.pid, "started": time.time() - 60,
       "heartbeat": time.time() - 1, "token": "crashed"}))
  # ... a half-copied step 5 (no commit record) and a truncated array file in step 3.
  (d / "checkpoints" / "5").mkdir()
  os.system(f"cp -r {d / 'checkpoints' / '3' / 'state'} {d / 'checkpoints' / '5'}")
  arrays = sorted((d / "checkpoints" / "3" / "state").rglob("ocdbt.process_0/d/*"),
                  key=lambda p: p.stat().st_size)
  os.truncate(arrays[-1], 100)
  # ... and the temporary folder of a save killed before its rename.
  (d / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000").mkdir()
  r = _run(d, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1", SANE)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("openmoe-train: ")]
  assert any("took over a stale lock" in l and "that process is not running" in l for l in lines)
  assert any(l.startswith("openmoe-train: checkpoint 5 is incomplete") for l in lines)
  assert any(l.startswith("openmoe-train: checkpoint 3 could not be read") and
             "resuming from checkpoint 2" in l for l in lines)
  assert checkpoint.list_steps(d) == [1, 2, 3, 4, 5, 6]
  aside = sorted(p.name for p in (d / checkpoint.SET_ASIDE_DIR).iterdir())
  assert any(l.startswith("openmoe-train: 4.orbax-checkpoint-tmp-1700000000 is the temporary "
                          "folder of a save that never finished") for l in lines)
  assert aside == ["3-unreadable", "4.orbax-checkpoint-tmp-1700000000-unfinished",
                   "5-incomplete"]  # kept for the user, not deleted
  assert "Traceback" not in r.stderr


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(tmp_path, monkeypatch):
  d = tmp_path / "run"
  (d / "checkpoints").mkdir(parents=True)
  monkeypatch.setattr(checkpoint, "list_steps", lambda _: [7])

  class Broken:
    def __init__(self, *a, **k):
      pass

    def restore(self, *a):
      raise RuntimeError("Event loop is closed")

    def close(self):
      pass

  monkeypatch.setattr(checkpoint, "Checkpointer", Broken)
  with pytest.raises(TrainingError, match=r"no checkpoint .* could be read \(newest, step "
                     r"7: RuntimeError: Event loop is closed\); nothing was changed"):
    resume.restore_newest(str(d), None, 3, say=lambda _: None)


def test_incomplete_step_folders_are_detected(tmp_path):
  d = tmp_path / "run"
  for name, meta in (("4", '{"commit_timestamp_nsecs": 1}'), ("6", ""), ("7", None)):
    step = d / "checkpoints" / name
    for item in ("state", "data"):
      (step / item).mkdir(parents=True)
    if meta is not None:
      (step / "_CHECKPOINT_METADATA").write_text(meta)
  (d / "checkpoints" / "8").mkdir()
  (d / "checkpoints" / "8" / "state").mkdir()
  assert checkpoint.list_steps(d) == [4]
  assert checkpoint.incomplete_steps(d) == [6, 7, 8]
  where = checkpoint.set_aside(d, 6, "incomplete")
  assert where.endswith(os.path.join(checkpoint.SET_ASIDE_DIR, "6-incomplete"))
  assert (pathlib.Path(where) / "state").is_dir() and not (d / "checkpoints" / "6").exists()


def test_run_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
  d = str(tmp_path / "run")
  first = run_lock.RunLock(d)
  assert first.acquire() is None
  with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
    run_lock.RunLock(d).acquire()
  # Another host's lock is live while its heartbeat is fresh, stale after `stale_secs`.
  other = dict(first.owner, host="elsewhere", pid=1, token="x", heartbeat=time.time())
  fs.write_text(first.path, json.dumps(other))
  with pytest.raises(UsageError, match="host elsewhere"):
    run_lock.RunLock(d).acquire()
  fs.write_text(first.path, json.dumps(dict(other, heartbeat=time.time() - 3600)))
  late = run_lock.RunLock(d)
  assert "no heartbeat for" in late.acquire()
  first.release()  # no longer its lock: left alone
  assert json.loads(fs.read_text(late.path))["token"] == late.owner["token"]
  late.release()
  assert not os.path.exists(late.path)


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
  lock = run_lock.RunLock(str(tmp_path), heartbeat_secs=0.05)
  lock.acquire()
  t0 = json.loads(fs.read_text(lock.path))["heartbeat"]
  time.sleep(0.3)
  assert json.loads(fs.read_text(lock.path))["heartbeat"] > t0
  lock.release()


@pytest.mark.parametrize("args,needle", [
    (["--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_ul2'"], "has no length for 'inputs'"),
    (["--gin.NUM_EMBEDDINGS=512"], "has 8192 ids but the model has NUM_EMBEDDINGS = 512"),
    (["--gin.TRAIN_STEPS=0"], "TRAIN_STEPS=0: must be a positive integer"),
    (["--gin.TRAIN_STEPS=-5"], "TRAIN_STEPS=-5"),
])
def test_late_checks_fail_before_model_dir_is_created(tmp_path, capsys, args, needle):
  from openmoe_jax.commands import train as main
  d = tmp_path / "run"
  assert main.main([*TINY, SANE, f"--gin.MODEL_DIR='{d}'", "--gin.TRAIN_STEPS=2", *args]) == 2
  last = _last_line(capsys.readouterr().err)
  assert last.startswith("openmoe-train: error: ") and needle in last, last
  assert not d.exists()


def test_model_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
  from openmoe_jax.commands import train as main
  f = tmp_path / "file"
  f.write_text("mine")
  assert main.main([*TINY, SANE, f"--gin.MODEL_DIR='{f}'", "--gin.TRAIN_STEPS=2"]) == 2
  assert "is a file, not a directory" in _last_line(capsys.readouterr().err)
  assert main.main([*TINY, SANE, f"--gin.MODEL_DIR='{f}/run'", "--gin.TRAIN_STEPS=2"]) == 2
  assert "cannot be created" in _last_line(capsys.readouterr().err)
  assert f.read_text() == "mine"
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main.main([*TINY, SANE, f"--gin.MODEL_DIR='{locked}/run'", "--gin.TRAIN_STEPS=2"]) == 2
    assert "is not writable" in _last_line(capsys.readouterr().err)


def test_misspelt_macro_in_a_users_gin_file(tmp_path, capsys, monkeypatch):
  from openmoe_jax.commands import train as main
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.gin").write_text("include 'quickstart.gin'\nNUM_EXPRTS = 4\n")
  assert main.main(["--gin_file=mine.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'"]) == 2
  assert _last_line(capsys.readouterr().err) == (
      "openmoe-train: error: macros set but used by no gin file: NUM_EXPRTS (mine.gin:2) "
      "(a typo? macro names are case-sensitive)")
  assert not (tmp_path / "run").exists()
  # The project's own gins may define macros nobody uses; a correct user file passes.
  gin_utils.parse_gin(["quickstart.gin"], [], finalize=False)
  (tmp_path / "ok.gin").write_text("include 'quickstart.gin'\nNUM_EXPERTS = 4\n")
  gin_utils.parse_gin(["ok.gin"], [], finalize=False)


def test_gin_syntax_error_names_the_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "bad.gin").write_text(
      "include 'quickstart.gin'\nTRAIN_STEPS = 2\nOPTIMIZER_KWARGS = {'warmup_steps': 1,\n"
      "  'decay_steps': 9\n\nBATCH_SIZE = 8\n")
  with pytest.raises(UsageError) as e:
    gin_utils.parse_gin(["bad.gin"], [])
  msg = str(e.value)
  assert msg.startswith(f"gin: {tmp_path / 'bad.gin'}:6: syntax error"), msg
  assert "unclosed bracket" in msg


def test_interrupts_first_sets_a_flag_second_aborts():
  handlers = console.Interrupts()
  try:
    assert not handlers.requested
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert handlers.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    handlers.restore()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_say_so_and_exit_cleanly(tmp_path, sig):
  d = tmp_path / "run"
  p = subprocess.Popen(_cmd(d, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000", SANE),
                       cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (d / "metrics.jsonl").exists():
    time.sleep(0.5)
  time.sleep(1)
  p.send_signal(sig)
  assert p.wait(timeout=120) == 0
  err = p.stderr.read()
  steps = checkpoint.list_steps(d)
  assert len(steps) == 1
  assert (f"openmoe-train: {signal.Signals(sig).name} received: saved checkpoint {steps[0]} in "
          in err), err[-2000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_leftovers_of_a_failed_read_are_dropped_and_nothing_else(monkeypatch, capsys):
  """After a damaged checkpoint fails to read, orbax's sibling reads report their errors late
  (unraisable exceptions, asyncio's 'exception was never retrieved'): those are dropped, any
  other unraisable or asyncio error still reaches the terminal."""
  import logging
  from openmoe_jax.training import resume
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", list(asyncio_log.filters))
  resume.quiet_failed_reads()

  def raised_in(filename, error):
    try:
      exec(compile("raise error", filename, "exec"), {"error": error})  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      return e

  class Unraisable:
    def __init__(self, e):
      self.exc_type, self.exc_value, self.exc_traceback = type(e), e, e.__traceback__
      self.err_msg, self.object = None, None
  from_orbax = raised_in("/site-packages/orbax/checkpoint/serialization.py", ValueError("read"))
  elsewhere = raised_in("/work/user_code.py", ValueError("mine"))
  # A TensorStore read future asyncio wrapped in a task: only asyncio's frame in its traceback.
  from_tensorstore = raised_in("/usr/lib/python3.11/asyncio/tasks.py", ValueError(
      'OUT_OF_RANGE: Error reading "params.decoder.layers_0.mlp.wo.kernel/0.0" in OCDBT '
      'database at local file "/tmp/run/checkpoints/2/state/": Requested byte range '
      '[257901, 259847) is not valid for value of size 100'))
  sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
  sys.unraisablehook(Unraisable(from_orbax))
  sys.unraisablehook(Unraisable(from_tensorstore))
  sys.unraisablehook(Unraisable(elsewhere))
  assert seen == [elsewhere]
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  asyncio_log.addHandler(handler)
  try:
    for e in (from_orbax, from_tensorstore, elsewhere):
      asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished>",
                        exc_info=(type(e), e, e.__traceback__))
    asyncio_log.error("Executing <Handle> took 0.2 seconds")
  finally:
    asyncio_log.removeHandler(handler)
  assert [r.exc_info[1] if r.exc_info else r.getMessage() for r in records] == [
      elsewhere, "Executing <Handle> took 0.2 seconds"]


def test_sigterm_during_start_up_exits_cleanly_and_releases_the_lock(tmp_path):
  """SIGTERM after the lock is taken, while the data pipeline is built: exit 0, one line that
  says so, nothing trained or saved, no lock left behind (a stale lock on a bucket would make
  the next start wait)."""
  d = tmp_path / "run"
  d.mkdir()  # the lock file appears while the start-up (data, restore or init) is under way
  p = subprocess.Popen(_cmd(d, "--gin.TRAIN_STEPS=1000", SANE), cwd=ROOT, env=ENV,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None and not (d / run_lock.LOCK_FILE).exists():
    time.sleep(0.02)
  assert (d / run_lock.LOCK_FILE).exists()
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 0, err[-3000:]
  assert "openmoe-train: SIGTERM received during start-up: stopped before training a step" in err
  assert "Traceback" not in err
  assert not (d / run_lock.LOCK_FILE).exists()
  assert checkpoint.list_steps(d) == [] and not (d / "metrics.jsonl").exists()
  assert "continue        the same command (it resumes" in err


def _small_disk(tmp_path, megabytes):
  """A tmpfs of `megabytes` at tmp_path/disk (root only: mounting needs it)."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mnt)],
      capture_output=True).returncode != 0:
    pytest.skip("mounting a small tmpfs needs root")
  return mnt


@pytest.mark.slow
def test_a_full_disk_mid_save_is_one_line_and_keeps_the_complete_checkpoints(tmp_path):
  """A real full disk (a 20 MB tmpfs: checkpoint 1 fits, 2 does not): exit 1, the cause in one
  line that is the last one printed, none of the save threads' tracebacks, checkpoint 1 intact."""
  mnt = _small_disk(tmp_path, 20)
  try:
    r = _run(mnt / "run", "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1",
             "--gin.KEEP_CHECKPOINTS=5", SANE)
    assert r.returncode == 1, r.stderr[-3000:]
    assert _last_line(r.stderr).startswith("openmoe-train: no space left on the device")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr[-3000:]
    assert checkpoint.list_steps(mnt / "run") == [1]
    assert _finite_checkpoints(mnt / "run") == {1: True}
  finally:
    subprocess.run(["umount", str(mnt)], check=False)
