"""Runs N openmoe-train processes on this machine (127.0.0.1, CPU devices), as a multi-host job
would: same command, process indices 0..N-1. Each output line is prefixed with `[i] `; when one
process fails the others are killed. --dry-run prints the N commands.

  python launch/local.py --num_processes=2 --num_cpu_devices=2 \\
      -- --gin_file=quickstart.gin --gin.MODEL_DIR="'/tmp/two_processes'"

Each process gets OPENMOE_COORDINATOR_ADDRESS, OPENMOE_PROCESS_COUNT and OPENMOE_PROCESS_INDEX
in its environment (docs/launch.md).
"""
import os
import socket
import signal
import subprocess
import sys
import threading
import time

import common


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def build_parser() -> common.Parser:
  p = common.Parser("local.py", __doc__)
  p.add_argument("--num_processes", type=common.positive_int, default=2,
                 help="processes to start (default 2)")
  p.add_argument("--num_cpu_devices", type=common.positive_int, default=1,
                 help="CPU devices per process (default 1)")
  p.add_argument("--port", type=int, default=0,
                 help="coordinator port on 127.0.0.1 (default: a free one)")
  p.add_argument("--python", default=sys.executable,
                 help="Python interpreter with openmoe_jax installed (default: this one)")
  return p


def commands(args, train_args):
  """[(environment additions, argv)] for processes 0..N-1."""
  port = args.port or free_port()
  argv = [args.python, "-m", "openmoe_jax.main", *train_args,
          f"--num_cpu_devices={args.num_cpu_devices}"]
  return [({"JAX_PLATFORMS": "cpu", "OPENMOE_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "OPENMOE_PROCESS_COUNT": str(args.num_processes), "OPENMOE_PROCESS_INDEX": str(i)},
           argv) for i in range(args.num_processes)]


def _forward(i: int, stream, lock: threading.Lock, held: dict) -> None:
  """Prefixes process i's lines with [i]. A traceback is held back until the run ends: when
  another process's failure caused it (it lost its peer), only that failure is said."""
  for line in stream:
    if i in held or line.startswith("Traceback (most recent call last):"):
      held.setdefault(i, []).append(line)
      continue
    with lock:
      sys.stdout.write(f"[{i}] {line}")
      sys.stdout.flush()


def run_all(cmds) -> int:
  """Starts every process, forwards their output; returns 0 or the first failure's exit code."""
  lock = threading.Lock()
  procs, threads, held = [], [], {}
  # Ctrl-C at a terminal reaches every process of the group: the training processes save a
  # checkpoint together and exit; this launcher waits for them. A second Ctrl-C stops them.
  presses = []

  def on_ctrl_c(*_):
    presses.append(1)
    if len(presses) > 1:
      raise KeyboardInterrupt
    print("local.py: Ctrl-C: waiting for the processes to save a checkpoint and stop "
          "(Ctrl-C again to kill them)", file=sys.stderr, flush=True)

  previous = signal.signal(signal.SIGINT, on_ctrl_c)
  for i, (env, argv) in enumerate(cmds):
    procs.append(subprocess.Popen(argv, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace"))
    threads.append(threading.Thread(target=_forward, args=(i, procs[-1].stdout, lock, held)))
    threads[-1].start()
  failed = None
  try:
    while failed is None and any(p.poll() is None for p in procs):
      failed = _first_failure(procs)
      time.sleep(0.05)
    failed = failed if failed is not None else _first_failure(procs)
  finally:  # a failure or Ctrl-C: the others would wait for it forever
    signal.signal(signal.SIGINT, previous)
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p, t in zip(procs, threads):
      p.wait()
      t.join()
  for i, lines in sorted(held.items()):
    if failed is None or i == failed:  # its own failure (or a clean run's): shown in full
      sys.stdout.write("".join(f"[{i}] {line}" for line in lines))
  sys.stdout.flush()
  if failed is not None:
    hidden = sorted(i for i in held if i != failed)
    print(f"local.py: process {failed} exited with code {procs[failed].returncode}; "
          "the others were stopped" + (f" (the traceback of process {', '.join(map(str, hidden))}"
                                       ", which lost its peer, is not shown)" if hidden else ""),
          file=sys.stderr)
    return procs[failed].returncode if procs[failed].returncode > 0 else 1
  return 0


def _first_failure(procs):
  """The process whose failure came first: one killed by a signal (the cause: the others then
  lose their peer and fail with an error of their own) before one that exited with an error."""
  codes = [(i, p.poll()) for i, p in enumerate(procs)]
  killed = [i for i, c in codes if c is not None and c < 0]
  errored = [i for i, c in codes if c]
  return (killed or errored or [None])[0]


def main(argv=None) -> int:
  p = build_parser()
  args, train_args = common.parse(p, argv, owned=common.OWNED_FLAGS + ("--num_cpu_devices",))
  if not 0 <= args.port <= 65535:
    p.error(f"--port={args.port} must be in 0..65535")
  cmds = commands(args, train_args)
  if args.dry_run:
    for env, argv in cmds:
      print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + common.join(argv))
    return 0
  try:
    return run_all(cmds)
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
