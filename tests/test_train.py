"""The training loop end to end on the built-in corpus with the tiny model."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.NUM_EMBEDDINGS=8192", "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
        "--gin.EVAL_PERIOD=0", "--gin.train.progress_bar=False", "--gin.train.log_period=1",
        "--gin.OPTIMIZER='adamw'",
        "--gin.OPTIMIZER_KWARGS={'base_learning_rate': 3e-3, 'warmup_steps': 2, 'decay_steps': 1000}"]


def _run(model_dir, *extra, env=None, timeout=300):
  cmd = [sys.executable, "-m", "openmoe_jax.main", *TINY, f"--gin.MODEL_DIR='{model_dir}'", *extra]
  e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **(env or {}))
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def _metrics(model_dir):
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
def test_loss_falls_and_resume_after_sigkill_is_exact(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r = _run(straight, "--gin.TRAIN_STEPS=24", "--gin.CHECKPOINT_PERIOD=12")
  assert r.returncode == 0, r.stderr[-3000:]
  m = _metrics(straight)
  assert sorted(m) == list(range(1, 25))
  assert np.mean([m[s]["loss"] for s in (22, 23, 24)]) < np.mean([m[s]["loss"] for s in (1, 2, 3)]) - 0.3
  for key in ("cross_entropy", "z_loss", "aux_loss", "router_z_loss", "moe/dropped_fraction",
              "moe/dropped_by_position", "moe/expert_load_cv", "learning_rate", "grad_norm",
              "perf/tokens_per_second", "perf/mfu"):
    assert key in m[24], key
  assert "BATCH_SIZE = 8" in (straight / "config.gin").read_text()
  assert list((straight / "tensorboard" / "train").iterdir())

  # Run to step 12 (checkpoint), then SIGKILL a continuation in the middle, then resume to 24.
  assert _run(resumed, "--gin.TRAIN_STEPS=12", "--gin.CHECKPOINT_PERIOD=12").returncode == 0
  p = subprocess.Popen([sys.executable, "-m", "openmoe_jax.main", *TINY,
                        f"--gin.MODEL_DIR='{resumed}'", "--gin.TRAIN_STEPS=1000",
                        "--gin.CHECKPOINT_PERIOD=1000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  deadline = time.time() + 240
  while time.time() < deadline and len(_metrics(resumed)) < 15:
    time.sleep(0.5)
  p.send_signal(signal.SIGKILL)
  p.wait()
  r = _run(resumed, "--gin.TRAIN_STEPS=24", "--gin.CHECKPOINT_PERIOD=12")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in open(resumed / "metrics.jsonl")]
  final = {}
  for row in rows:  # the last value written for each step wins (the killed run's are superseded)
    final[row["step"]] = row
  for s in range(13, 25):
    assert final[s]["loss"] == pytest.approx(m[s]["loss"], rel=1e-6, abs=1e-6), s


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  d = tmp_path / "term"
  p = subprocess.Popen([sys.executable, "-m", "openmoe_jax.main", *TINY, f"--gin.MODEL_DIR='{d}'",
                        "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  deadline = time.time() + 240
  while time.time() < deadline and not (d / "metrics.jsonl").exists():
    time.sleep(0.5)
  time.sleep(2)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
  from openmoe_jax import checkpoint
  steps = checkpoint.list_steps(d)
  assert len(steps) == 1 and steps[0] >= max(_metrics(d)) - 1


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  d = tmp_path / "nan"
  assert _run(d, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2").returncode == 0
  r = _run(d, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1", "--gin.Z_LOSS=1e38")
  assert r.returncode == 1
  assert "at step 3" in r.stderr and "step 2" in r.stderr
  from openmoe_jax import checkpoint
  assert checkpoint.list_steps(d) == [2]
  params = checkpoint.restore_params(d, 2)
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(params))


@pytest.mark.parametrize("args,needle", [
    (["--gin.TRAIN_STEPS=%gin.REQUIRED"], "TRAIN_STEPS"),
    (["--gin.train.no_such_arg=1"], "no_such_arg"),
    (["--gin.NUM_EXPERT_PARTITIONS=3"], "expert=3"),
    (["--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], "no_such_task"),
])
def test_bad_configuration_fails_with_one_line_and_exit_2(tmp_path, args, needle):
  r = _run(tmp_path / "bad", "--gin.TRAIN_STEPS=2", *args)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("openmoe-train")]
  assert len(lines) == 1 and needle in lines[0]


def test_incompatible_model_dir_is_refused_and_untouched(tmp_path):
  d = tmp_path / "run"
  assert _run(d, "--gin.TRAIN_STEPS=1", "--gin.CHECKPOINT_PERIOD=1").returncode == 0
  before = sorted(p.name for p in (d / "checkpoints").iterdir())
  r = _run(d, "--gin.TRAIN_STEPS=2", "--gin.EMBED_DIM=64")
  assert r.returncode == 2 and "different model" in r.stderr and "emb_dim" in r.stderr
  assert sorted(p.name for p in (d / "checkpoints").iterdir()) == before


def test_resume_onto_a_different_mesh(tmp_path):
  d = tmp_path / "remesh"
  assert _run(d, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2").returncode == 0
  r = _run(d, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", "--gin.NUM_EXPERT_PARTITIONS=2")
  assert r.returncode == 0, r.stderr[-2000:]
  from openmoe_jax import checkpoint
  assert checkpoint.list_steps(d) == [2, 4]
  assert sorted(_metrics(d)) == [1, 2, 3, 4]
