"""Loss-spike detection and rollback (openmoe_jax/training/spikes.py, train.spike_rollbacks)."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from openmoe_jax.training import checkpoint, spikes

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_detector_against_a_hand_computed_sequence():
  d = spikes.SpikeDetector(threshold=3.0, min_steps=3, window=4, min_relative_std=0.1)
  # Warm-up (3 finite steps): equal weights, so mean 11 and population variance 2/3.
  for loss in (10.0, 12.0, 11.0):
    assert d.check(loss, 1.0) is None
  assert d.count == 3 and d.mean["loss"] == pytest.approx(11.0)
  assert d.var["loss"] == pytest.approx(2 / 3)
  # std sqrt(2/3) = 0.816 is below the floor 0.1 x 11 = 1.1: limit 11 + 3 x 1.1 = 14.3.
  assert d.limit("loss") == pytest.approx(14.3)
  assert d.check(14.0, 1.0) is None
  # Weight 1/4 (the window): diff 3, mean 11.75, var 3/4 x (2/3 + 3 x 0.75) = 2.1875.
  assert d.mean["loss"] == pytest.approx(11.75)
  assert d.var["loss"] == pytest.approx(2.1875)
  assert d.limit("loss") == pytest.approx(11.75 + 3 * math.sqrt(2.1875))  # 16.187
  before = d.get_state()
  assert "loss 17 above" in d.check(17.0, 1.0)
  assert d.check(float("nan"), 1.0) == "loss is nan"
  assert d.check(12.0, float("inf")) == "grad_norm is inf"
  # grad_norm: mean 1, var 0, floor 0.1: limit 1.3.
  assert d.check(12.0, 1.5).startswith("grad_norm 1.5 above")
  assert d.get_state() == before  # spikes never enter the statistics
  assert d.check(12.0, 1.2) is None
  assert d.mean["loss"] == pytest.approx(11.75 + 0.25 * 0.25)
  # The state is small JSON and restores the same limits.
  other = spikes.SpikeDetector(threshold=3.0, min_steps=3, window=4, min_relative_std=0.1)
  other.set_state(json.loads(json.dumps(d.get_state())))
  assert other.limit("loss") == d.limit("loss") and other.limit("grad_norm") == d.limit("grad_norm")
  other.set_state(None)
  assert other.count == 0 and other.limit("loss") == math.inf


def test_no_spike_during_warm_up_but_non_finite_always():
  d = spikes.SpikeDetector(threshold=6.0, min_steps=2)
  assert d.check(5.0, 1.0) is None
  assert d.check(500.0, 100.0) is None  # the second step of the warm-up
  d = spikes.SpikeDetector(threshold=6.0, min_steps=2)
  assert d.check(float("nan"), 1.0) == "loss is nan"
  assert d.count == 0


def test_spike_settings_are_checked():
  from openmoe_jax.errors import UsageError
  from openmoe_jax.training import settings
  for name, bad in (("spike_rollbacks", -1), ("spike_skip_batches", -2), ("spike_window", 0),
                    ("spike_rollback_steps", 0)):
    with pytest.raises(UsageError, match=f"train.{name}="):
      settings.check({name: bad})


@pytest.mark.parametrize("bad", [0, -1.5, "6", True])
def test_a_bad_threshold_is_refused_before_model_dir_is_touched(tmp_path, bad):
  from openmoe_jax.errors import UsageError
  from openmoe_jax.model.config import ModelConfig
  from openmoe_jax.training import loop
  with pytest.raises(UsageError, match=r"^train.spike_threshold=.*: must be a positive number$"):
    loop.train(ModelConfig(), model_dir=str(tmp_path / "run"),
               mixture_or_task_name="builtin_corpus_full_lm",
               task_feature_lengths={"targets": 32}, train_steps=4, batch_size=8,
               spike_rollbacks=1, spike_threshold=bad)
  assert not (tmp_path / "run").exists()


# --- end to end: a tiny run whose data holds one poisoned example ---------------------------

# A task of plain text lines whose examples POISON have token ids past the embedding table: the
# embedding lookup of their batches reads NaN (jnp.take fills out-of-range rows), so those
# batches, and only those, make a non-finite loss: a deterministic spike tied to the data.
TASKS = '''
import seqio
import tensorflow as tf

from openmoe_jax import vocab
from tasks import common

DATA = {data!r}


def lines_to_text(dataset):
  return dataset.map(lambda line: {{"text": line}})


def poison(at):
  return lambda dataset: dataset.enumerate().map(lambda i, ex: plant(i, ex, at))


def plant(i, ex, POISON):
  bad = tf.fill(tf.shape(ex["targets"]), tf.constant(10 ** 6, ex["targets"].dtype))
  hit = tf.reduce_any(tf.equal(i, tf.constant(POISON, tf.int64)))
  return {{**ex, "targets": tf.where(hit, bad, ex["targets"])}}


for name, POISON in (("spiky_full_lm", [50]), ("twice_spiky_full_lm", [50, 80])):
  if name in seqio.TaskRegistry.names():
    continue
  seqio.TaskRegistry.add(
      name,
      source=seqio.TextLineDataSource({{"train": f"{{DATA}}/train.txt",
                                       "validation": f"{{DATA}}/validation.txt"}}),
      preprocessors=[lines_to_text, *common.preprocessors("full_lm"), poison(POISON)],
      output_features=common.output_features(vocab.builtin_vocabulary()), metric_fns=[],
      shuffle_buffer_size=1)
'''

TINY = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.NUM_EMBEDDINGS=8192", "--gin.MIXTURE_OR_TASK_NAME='spiky_full_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
        "--gin.EVAL_PERIOD=0", "--gin.train.progress_bar=False", "--gin.train.log_period=1",
        "--gin.OPTIMIZER='adamw'", "--gin.train.peak_flops_per_device=1e12",
        "--gin.OPTIMIZER_KWARGS={'base_learning_rate': 3e-3, 'warmup_steps': 1, "
        "'decay_steps': 1000}"]


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
  """(gin file importing the spiky task, environment): the task's module on PYTHONPATH."""
  d = tmp_path_factory.mktemp("spiky")
  (d / "data").mkdir()
  import random
  rng = random.Random(0)
  words = "the cat sat on a mat and then ran off to find more fish in the sea".split()
  for split, n in (("train", 400), ("validation", 20)):
    (d / "data" / f"{split}.txt").write_text(
        "".join(" ".join(rng.choices(words, k=20)) + "\n" for _ in range(n)))
  (d / "spiky_tasks.py").write_text(TASKS.format(data=str(d / "data")))
  (d / "spiky.gin").write_text("import spiky_tasks\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(d), str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return d / "spiky.gin", env


def _run(spiky, model_dir, *extra, timeout=400):
  gin_file, env = spiky
  cmd = [sys.executable, "-m", "openmoe_jax.main", f"--gin_file={gin_file}", *TINY,
         f"--gin.MODEL_DIR='{model_dir}'", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


SPIKE_FLAGS = ["--gin.TRAIN_STEPS=12", "--gin.CHECKPOINT_PERIOD=2", "--gin.KEEP_CHECKPOINTS=20",
               "--gin.train.spike_rollbacks=2", "--gin.train.spike_skip_batches=1",
               "--gin.train.spike_rollback_steps=3", "--gin.train.spike_min_steps=3"]


def _final_loss(model_dir):
  rows = [json.loads(l) for l in open(model_dir / "metrics.jsonl")]
  return [r for r in rows if r["step"] == 12][-1]["loss"]


def _decision(x):
  return {k: v for k, v in x.items() if k != "set_aside"}  # paths differ between runs


@pytest.fixture(scope="module")
def spiked(spiky, tmp_path_factory):
  """(MODEL_DIR, stderr) of a run whose step 7 or so reads the poisoned batch."""
  d = tmp_path_factory.mktemp("spiked") / "run"
  r = _run(spiky, d, *SPIKE_FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  return d, r.stderr


@pytest.mark.slow
def test_a_spike_is_rolled_back_and_the_run_reaches_train_steps(spiked):
  d, stderr = spiked
  decisions = spikes.read(str(d))
  assert len(decisions) == 1, decisions
  dec = decisions[0]
  s, target = dec["step"], dec["rolled_back_to"]
  assert dec["reason"] == "loss is nan", dec
  assert 2 <= target <= s - 3 and target % 2 == 0
  start, stop = dec["skipped_batches"]
  assert start == target  # no skip before this one: batch k trained step k + 1
  assert stop == start + (s - target) + 1  # the spike's batches and one more
  line = next(l for l in stderr.splitlines() if "loss spike at step" in l)
  assert line.startswith(f"openmoe-train: loss spike at step {s} (loss nan, grad_norm nan; "
                         "running mean ")
  assert line.endswith(f"rolled back to checkpoint {target}, skipping batches {start}..{stop - 1}; "
                       "rollback 1 of 2")
  # Checkpoints after the target and before the spike are set aside, never deleted.
  aside = sorted(p.name for p in (d / checkpoint.SET_ASIDE_DIR).iterdir())
  expected = [f"{k}-spike" for k in range(target + 2, s, 2)]
  assert expected and aside == expected
  assert checkpoint.list_steps(d) == list(range(2, 13, 2))
  assert math.isfinite(_final_loss(d))


@pytest.mark.slow
def test_a_rerun_from_scratch_makes_the_same_decision(spiky, spiked, tmp_path):
  d, _ = spiked
  d2 = tmp_path / "again"
  r = _run(spiky, d2, *SPIKE_FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [_decision(x) for x in spikes.read(str(d2))] == [
      _decision(x) for x in spikes.read(str(d))]
  assert _final_loss(d2) == _final_loss(d)


@pytest.mark.slow
def test_a_run_killed_after_the_rollback_replays_it(spiky, spiked, tmp_path):
  """Killed after the rollback and before the next save: MODEL_DIR holds the target as its
  newest checkpoint; the rerun meets the same spike and decides alike."""
  d, _ = spiked
  (dec,) = spikes.read(str(d))
  d3 = tmp_path / "killed"
  shutil.copytree(d, d3)
  for s in checkpoint.list_steps(d3):
    if s > dec["rolled_back_to"]:
      shutil.rmtree(d3 / "checkpoints" / str(s))
  r = _run(spiky, d3, *SPIKE_FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [_decision(x) for x in spikes.read(str(d3))] == [_decision(dec)] * 2
  assert _final_loss(d3) == _final_loss(d)


@pytest.mark.slow
def test_without_an_older_checkpoint_the_spike_stops_the_run(spiky, tmp_path):
  d = tmp_path / "run"
  r = _run(spiky, d, *SPIKE_FLAGS, "--gin.train.spike_rollback_steps=1000")
  assert r.returncode == 1, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("openmoe-train: loss spike at step ") and "stopped" in last, last
  assert "no checkpoint at least train.spike_rollback_steps=1000 steps before it" in last
  assert not spikes.read(str(d))


@pytest.mark.slow
def test_a_spike_after_the_last_rollback_stops_the_run(spiky, tmp_path):
  d = tmp_path / "run"
  r = _run(spiky, d, *SPIKE_FLAGS, "--gin.train.spike_rollbacks=1",
           "--gin.MIXTURE_OR_TASK_NAME='twice_spiky_full_lm'")
  assert r.returncode == 1, r.stderr[-3000:]
  (dec,) = spikes.read(str(d))
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("openmoe-train: loss spike at step ") and "stopped" in last, last
  assert "all 1 rollbacks of train.spike_rollbacks are used" in last
  # Nothing from the second spike on is saved: the newest checkpoint is before it.
  second = int(last.split("loss spike at step ")[1].split()[0])
  assert checkpoint.list_steps(d)[-1] < second
