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
  e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  e.update(env or {})
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
  """A 2-step TINY run with its checkpoint at step 2, made once per test worker: tests that need
  one to resume, fine-tune or refuse copy it (`copy_of`) or only read it."""
  d = tmp_path_factory.mktemp("base") / "run"
  r = _run(d, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2")
  assert r.returncode == 0, r.stderr[-3000:]
  return d


def copy_of(run_dir, to):
  import shutil
  shutil.copytree(run_dir, to)
  return to


def _metrics(model_dir):
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "loss" in r}


# The SIGKILL run trains with the loss-free balancing bias on (training state outside the
# optimizer, `training/expert_bias.py`): it too must resume bitwise.
BIAS = "--gin.EXPERT_BIAS_UPDATE_RATE=1e-3"


@pytest.mark.slow
def test_loss_falls_and_resume_after_sigkill_is_exact(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r = _run(straight, "--gin.TRAIN_STEPS=24", "--gin.CHECKPOINT_PERIOD=12", BIAS)
  assert r.returncode == 0, r.stderr[-3000:]
  m = _metrics(straight)
  assert sorted(m) == list(range(1, 25))
  assert np.mean([m[s]["loss"] for s in (22, 23, 24)]) < np.mean([m[s]["loss"] for s in (1, 2, 3)]) - 0.3
  for key in ("cross_entropy", "z_loss", "aux_loss", "router_z_loss", "moe/dropped_fraction",
              "moe/dropped_by_position", "moe/expert_load_cv", "learning_rate", "grad_norm",
              "perf/tokens_per_second", "perf/mfu", "moe/expert_bias_abs_max"):
    assert key in m[24], key
  # perf/ times finished steps on the device: not the first (its compile), never above the peak.
  assert "perf/mfu" not in m[1]
  assert all(0 < m[s]["perf/mfu"] <= 1 for s in range(2, 25)), [m[s]["perf/mfu"] for s in m]
  assert "BATCH_SIZE = 8" in (straight / "config.gin").read_text()
  assert list((straight / "tensorboard" / "train").iterdir())

  # Run to step 12 (checkpoint), then SIGKILL a continuation in the middle, then resume to 24.
  assert _run(resumed, "--gin.TRAIN_STEPS=12", "--gin.CHECKPOINT_PERIOD=12", BIAS).returncode == 0
  p = subprocess.Popen([sys.executable, "-m", "openmoe_jax.main", *TINY,
                        f"--gin.MODEL_DIR='{resumed}'", "--gin.TRAIN_STEPS=1000",
                        "--gin.CHECKPOINT_PERIOD=1000", BIAS], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  deadline = time.time() + 240
  while time.time() < deadline and len(_metrics(resumed)) < 15:
    time.sleep(0.5)
  p.send_signal(signal.SIGKILL)
  p.wait()
  r = _run(resumed, "--gin.TRAIN_STEPS=24", "--gin.CHECKPOINT_PERIOD=12", BIAS)
  assert r.returncode == 0, r.stderr[-3000:]
  # The input pipeline's saved position is restored (constant time), not replayed.
  assert "openmoe-train: input restored at batch 12 from the saved pipeline position" in r.stderr
  assert (resumed / "checkpoints" / "12" / "data_positions" / "shard_00000.tfdata").stat().st_size
  rows = [json.loads(l) for l in open(resumed / "metrics.jsonl") if l.endswith("}\n")]
  final = {}
  for row in rows:  # the last value written for each step wins (the killed run's are superseded)
    final[row["step"]] = row
  for s in range(13, 25):
    assert final[s]["loss"] == pytest.approx(m[s]["loss"], rel=1e-6, abs=1e-6), s
  # The whole state at step 24, the bias included, is bitwise the uninterrupted run's.
  from openmoe_jax.training import checkpoint as ckpt_lib
  a, b = (ckpt_lib.restore_params(str(d), 24) for d in (straight, resumed))
  bias = a["decoder"]["layers_1"]["mlp"]["expert_bias"]
  assert np.abs(bias).max() > 0 and final[24]["moe/expert_bias_abs_max"] > 0
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)


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
  from openmoe_jax.training import checkpoint
  steps = checkpoint.list_steps(d)
  assert len(steps) == 1 and steps[0] >= max(_metrics(d)) - 1


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, base_run):
  d = copy_of(base_run, tmp_path / "nan")
  r = _run(d, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=1", "--gin.Z_LOSS=1e38")
  assert r.returncode == 1
  assert "at step 3" in r.stderr and "step 2" in r.stderr
  from openmoe_jax.training import checkpoint
  assert checkpoint.list_steps(d) == [2]
  params = checkpoint.restore_params(d, 2)
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(params))


@pytest.mark.parametrize("args,needle", [
    (["--gin.TRAIN_STEPS=%gin.REQUIRED", "--gin.BATCH_SIZE=%gin.REQUIRED"],
     "required macros not set: TRAIN_STEPS, BATCH_SIZE"),
    (["--gin.train.no_such_arg=1"], "no_such_arg"),
    (["--gin.NUM_EXPERT_PARTITIONS=3"], "expert=3"),
    (["--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], "no_such_task"),
    (["--gin.BATCH_SIZE=3"], "BATCH_SIZE=3 must be divisible"),  # raised inside `train`
    (["--gin.NUM_MODEL_PARTITIONS=2", "--gin.MLP_DIM=63"], "(63) is not divisible by its 2"),
    (["--gin.OPTIMIZER_KWARGS={'warmup_steps': 30, 'decay_steps': 20}"],
     "cosine needs decay_steps (20, usually TRAIN_STEPS) > warmup_steps (30)"),
    (["--gin.MIXTURE_OR_TASK_NAME='redpajama_c4_full_lm'"], "no data for redpajama_c4"),
    (["--gin.MIXTURE_OR_TASK_NAME='redpajama_c4_full_lm'",
      "--gin.tasks.sources.data_dirs.redpajama_dir='{data}'"], "no umT5 SentencePiece model"),
])
def test_bad_configuration_fails_with_one_line_and_exit_2(tmp_path, monkeypatch, args, needle):
  for name in ("OPENMOE_REDPAJAMA_DIR", "OPENMOE_TFDS_DATA_DIR", "OPENMOE_SPM_PATH"):
    monkeypatch.delenv(name, raising=False)
  (tmp_path / "data" / "c4").mkdir(parents=True)
  (tmp_path / "data" / "c4" / "a.jsonl").write_text('{"text": "hello"}\n')
  args = [a.replace("{data}", str(tmp_path / "data")) for a in args]
  r = _run(tmp_path / "bad", "--gin.TRAIN_STEPS=2", *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "In call to configurable" not in r.stderr, r.stderr
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("openmoe-train")]
  assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("openmoe-train: error: ")
  assert not (tmp_path / "bad").exists()  # nothing written before the checks


def test_missing_required_macros_are_named_together(capsys):
  from openmoe_jax.commands import train as main
  assert main.main(["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["openmoe-train: error: required macros not set: MODEL_DIR, MIXTURE_OR_TASK_NAME, "
                 "TASK_FEATURE_LENGTHS, TRAIN_STEPS, BATCH_SIZE (e.g. --gin.MODEL_DIR=...)"]


def _snapshot(d):
  return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*")}


def test_incompatible_model_dir_is_refused_and_untouched(tmp_path, base_run):
  d = copy_of(base_run, tmp_path / "run")
  before = _snapshot(d)
  r = _run(d, "--gin.TRAIN_STEPS=3", "--gin.EMBED_DIM=64")
  assert r.returncode == 2 and "different model" in r.stderr and "emb_dim" in r.stderr
  assert _snapshot(d) == before
  # Other data settings: the saved data position does not match (one line, nothing changed).
  r = _run(d, "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=4")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("openmoe-train")]
  assert lines == ["openmoe-train: error: data state does not match this iterator (saved, "
                   "current): {'batch_size': (8, 4)}"]
  assert _snapshot(d) == before


def test_finetuning_continues_the_schedule_and_writes_config_gin(tmp_path, base_run):
  import jax
  from openmoe_jax.training import checkpoint
  from openmoe_jax.training.optimizer import make_schedule
  base, tuned = base_run, tmp_path / "tuned"
  r = _run(tuned, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3",
           f"--gin.train.initial_checkpoint_dir='{base}'")
  assert r.returncode == 0, r.stderr[-2000:]
  m = _metrics(tuned)
  assert sorted(m) == [3]
  # TINY's AdamW schedule warms up from lr 0 over 2 steps: step 3 applies lr(2) = the peak. A
  # schedule restarted at the fresh update count would apply lr(0) = 0 and change nothing.
  lr = make_schedule("cosine", base_learning_rate=3e-3, warmup_steps=2, decay_steps=1000)
  assert m[3]["learning_rate"] == pytest.approx(float(lr(2)), rel=1e-6) == pytest.approx(3e-3)
  before = jax.tree.leaves(checkpoint.restore_params(base, 2))
  after = jax.tree.leaves(checkpoint.restore_params(tuned, 3))
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert "train.initial_checkpoint_dir" in (tuned / "config.gin").read_text()


def test_step_offset_of_a_finetuning_run_drives_the_applied_learning_rate():
  # pylint: disable=protected-access
  import jax.numpy as jnp
  from openmoe_jax.training import resume
  from openmoe_jax.training import run_setup
  params, grads = {"w": jnp.ones((4, 4))}, {"w": jnp.full((4, 4), 0.5)}
  for name in ("adafactor", "adamw"):
    tx, _ = run_setup.make_tx(name, {"decay_steps": 10_000})
    _, opt_state = tx.update(grads, tx.init(params), params)
    # A resumed fine-tuning run recovers its offset as step - update count.
    assert resume.update_count(opt_state, default=-1) == 1
  assert resume.update_count({}, default=7) == 7
  # The first update of an offset optimizer applies the schedule at the offset.
  kwargs = {"base_learning_rate": 1.0, "warmup_steps": 10, "decay_steps": 100}
  shifted, schedule = run_setup.make_tx("adamw", kwargs, step_offset=5)
  fixed, _ = run_setup.make_tx("adamw", {"learning_rate_schedule": "constant",
                                             "base_learning_rate": float(schedule(5))})
  got, _ = shifted.update(grads, shifted.init(params), params)
  want, _ = fixed.update(grads, fixed.init(params), params)
  assert float(schedule(5)) == pytest.approx(0.5)
  np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
  assert not np.allclose(np.asarray(got["w"]), 0.0)


@pytest.mark.slow
def test_resume_onto_another_mesh_is_exact_and_said(tmp_path):
  """A checkpoint of (data 2, expert 4) on 8 devices resumes on (expert 8) and on 1 device with
  the same next-step loss, once the routing grouping is kept; changing it silently is refused."""
  import shutil
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  base = tmp_path / "base"
  r = _run(base, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2",
           "--gin.NUM_EXPERT_PARTITIONS=4", env=eight)
  assert r.returncode == 0, r.stderr[-2000:]
  info = json.loads((base / "run.json").read_text())
  assert info["num_expert_replicas"] == 2 and info["mesh"] == {"data": 2, "expert": 4, "model": 1}
  copies = {}
  for name in ("same", "expert8", "one"):
    copies[name] = tmp_path / name
    shutil.copytree(base, copies[name])
  r = _run(copies["same"], "--gin.TRAIN_STEPS=3", "--gin.NUM_EXPERT_PARTITIONS=4", env=eight)
  assert r.returncode == 0, r.stderr[-2000:]
  want = _metrics(copies["same"])[3]["loss"]
  # The data axis shrinks from 2 to 1: the routing groups would change, so it asks.
  r = _run(copies["expert8"], "--gin.TRAIN_STEPS=3", "--gin.NUM_EXPERT_PARTITIONS=8", env=eight)
  assert r.returncode == 2
  assert "--gin.train.num_expert_replicas=2" in r.stderr.strip().splitlines()[-1]
  for name, flags, env in (("expert8", ["--gin.NUM_EXPERT_PARTITIONS=8"], eight),
                           ("one", [], {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})):
    r = _run(copies[name], "--gin.TRAIN_STEPS=3", "--gin.train.num_expert_replicas=2", *flags,
             env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming with mesh data 2 x expert 4 x model 1 -> " in r.stderr
    assert _metrics(copies[name])[3]["loss"] == pytest.approx(want, rel=2e-6, abs=2e-6), name
  # Every start is on record: config.gin from step 0 and config-<step>.gin per start.
  assert sorted(p.name for p in copies["one"].glob("config*.gin")) == [
      "config-0.gin", "config-2.gin", "config.gin"]
  assert "# command: " in (copies["one"] / "config-2.gin").read_text()
