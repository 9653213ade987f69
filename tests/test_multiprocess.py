"""Two CPU processes over 127.0.0.1 (2 devices each) train like one process with 4 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from test_train import TINY

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(model_dir, *extra):
  return [sys.executable, "-m", "openmoe_jax.main", *TINY, f"--gin.MODEL_DIR='{model_dir}'",
          "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3", "--gin.NUM_EXPERT_PARTITIONS=2",
          "--gin.train.num_data_shards=2", *extra]


def _losses(model_dir):
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  single = subprocess.run(_cmd(tmp_path / "single", "--num_cpu_devices=4"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(_cmd(tmp_path / "multi", "--num_cpu_devices=2",
                                 f"--coordinator_address=127.0.0.1:{port}", "--process_count=2",
                                 f"--process_index={i}"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(a) == len(b) == 3
  assert a == pytest.approx(b, rel=1e-5)
  from openmoe_jax import checkpoint
  assert checkpoint.list_steps(tmp_path / "multi") == [3]
