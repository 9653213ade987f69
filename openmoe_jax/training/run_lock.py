"""One trainer per MODEL_DIR: a lock file with the owner's host, pid, start time and heartbeat.

MODEL_DIR/RUN_LOCK is a small JSON file. A local one is created with O_CREAT | O_EXCL, so two
trainers starting together cannot both take it; on an object store (gs://, where no exclusive
create exists through tf.io.gfile) the lock is written and read back after a pause, and the
trainer whose token is not the one read back refuses to start. While the run lives, a thread
rewrites the heartbeat every `heartbeat_secs`. A lock whose owner is gone is stale and taken over
with a message: on the same host when its pid no longer runs, on any host when its heartbeat is
older than `stale_secs` (a SIGKILLed run or a lost machine cannot remove its own lock).
"""
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from openmoe_jax import fs
from openmoe_jax.errors import UsageError

LOCK_FILE = "RUN_LOCK"


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _describe(owner: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
  return f"host {owner.get('host')}, pid {owner.get('pid')}, started {started}"


class RunLock:
  """The MODEL_DIR lock of this process (use `acquire`, then `release`)."""

  def __init__(self, model_dir: str, *, heartbeat_secs: float = 30.0, stale_secs: float = 300.0):
    self.path = fs.join(model_dir, LOCK_FILE)
    self.heartbeat_secs, self.stale_secs = heartbeat_secs, stale_secs
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "token": uuid.uuid4().hex, "command": " ".join(sys.argv)}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _content(self) -> str:
    return json.dumps(dict(self.owner, heartbeat=time.time()))

  def _read(self) -> Optional[dict]:
    try:
      return json.loads(fs.read_text(self.path))
    except (OSError, ValueError):
      return None  # gone, or half-written by a writer that died: decided by the file's age

  def _stale_reason(self, other: Optional[dict]) -> Optional[str]:
    """Why the existing lock is stale, or None when its owner may still be running."""
    if other is None:
      if fs.is_url(self.path):
        return "unreadable lock file"
      try:
        age = time.time() - os.path.getmtime(self.path)
      except OSError:
        return "lock file removed"
      return "unreadable lock file" if age > self.stale_secs else None
    if other.get("host") == self.owner["host"] and not _pid_running(int(other.get("pid", -1))):
      return "that process is not running"
    age = time.time() - float(other.get("heartbeat", 0))
    if age > self.stale_secs:
      return f"no heartbeat for {age:.0f} s"
    return None

  def _refuse(self, other: Optional[dict]):
    who = _describe(other) if other else "an unknown process"
    raise UsageError(f"MODEL_DIR is in use by another openmoe-train ({who}); wait for it to "
                     f"finish, or use another MODEL_DIR (lock file {self.path})")

  def acquire(self) -> Optional[str]:
    """Takes the lock; returns a message when a stale lock was taken over, else None.

    Raises:
      UsageError: another live trainer holds the lock (the message names it).
    """
    taken_over = None
    if not fs.is_url(self.path):
      fs.makedirs(os.path.dirname(self.path))
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(self._content())
      except FileExistsError:
        other = self._read()
        reason = self._stale_reason(other)
        if reason is None:
          self._refuse(other)
        who = _describe(other) if other else "unknown owner"
        taken_over = f"took over a stale lock ({who}: {reason})"
        fs.write_text(self.path, self._content())
    else:
      other = self._read() if fs.exists(self.path) else None
      if other is not None:
        reason = self._stale_reason(other)
        if reason is None:
          self._refuse(other)
        taken_over = f"took over a stale lock ({_describe(other)}: {reason})"
      fs.write_text(self.path, self._content())
    # A rival that replaced the file between our write and now wins; we refuse.
    time.sleep(0.0 if not fs.is_url(self.path) else 2.0)
    now = self._read()
    if not now or now.get("token") != self.owner["token"]:
      self._refuse(now)
    self._thread = threading.Thread(target=self._beat, name="openmoe-run-lock", daemon=True)
    self._thread.start()
    return taken_over

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_secs):
      current = self._read()
      if current is not None and current.get("token") != self.owner["token"]:
        return  # taken over: never overwrite another run's lock
      try:
        fs.write_text(self.path, self._content())
      except OSError:
        pass  # transient (e.g. a bucket hiccup); the next beat tries again

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    current = self._read()
    if current is not None and current.get("token") == self.owner["token"]:
      fs.remove(self.path)
