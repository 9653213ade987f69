"""Every run setting checked before anything is written (openmoe_jax/training/settings.py)."""
import inspect
import os
import pathlib
import subprocess
import sys

import pytest

from openmoe_jax.errors import UsageError
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.training import loop, settings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_argument_of_train_is_in_the_table():
  args = set(inspect.signature(loop.train).parameters)
  assert args == set(settings.SETTINGS) | set(settings.CHECKED_ELSEWHERE)
  assert not set(settings.SETTINGS) & set(settings.CHECKED_ELSEWHERE)


@pytest.mark.parametrize("name,value", [
    ("keep_checkpoints", 0), ("keep_checkpoints", -1), ("checkpoint_period", 0),
    ("log_period", 0), ("eval_steps", 0), ("batch_size", 0), ("batch_size", -8),
    ("batch_size", "abc"), ("batch_size", 8.0), ("batch_size", True), ("train_steps", 0),
    ("eval_period", -1), ("num_microbatches", 0), ("seed", "0"), ("pack", 1)])
def test_a_bad_value_is_one_line_naming_the_setting(name, value):
  with pytest.raises(UsageError) as e:
    settings.check({name: value})
  line = str(e.value)
  assert "\n" not in line and line.startswith(f"{settings.SETTINGS[name][0]}={value!r}: must be")


def test_good_values_and_bad_feature_lengths():
  settings.check({"keep_checkpoints": 1, "eval_period": 0, "seed": -3, "pack": False,
                  "task_feature_lengths": {"inputs": 8, "targets": 8}})
  for bad in ({}, {"targets": 0}, {"targets": "128"}, [("targets", 128)]):
    with pytest.raises(UsageError, match="TASK_FEATURE_LENGTHS"):
      settings.check({"task_feature_lengths": bad})


def _listing(d: pathlib.Path):
  return sorted((str(p.relative_to(d)), p.read_bytes() if p.is_file() else b"")
                for p in d.rglob("*"))


@pytest.mark.parametrize("bad", [{"keep_checkpoints": 0}, {"keep_checkpoints": -1},
                                 {"checkpoint_period": 0}, {"log_period": 0},
                                 {"eval_steps": 0}, {"batch_size": 0}])
def test_train_refuses_before_touching_model_dir(tmp_path, bad):
  run = tmp_path / "run"
  (run / "checkpoints" / "7").mkdir(parents=True)
  (run / "checkpoints" / "7" / "marker").write_text("a user's checkpoint")
  before = _listing(run)
  kw = dict(model_dir=str(run), mixture_or_task_name="builtin_corpus_full_lm",
            task_feature_lengths={"targets": 32}, train_steps=4, batch_size=8)
  kw.update(bad)
  with pytest.raises(UsageError, match=settings.SETTINGS[next(iter(bad))][0]):
    loop.train(ModelConfig(), **kw)
  assert _listing(run) == before
  fresh = tmp_path / "fresh"
  with pytest.raises(UsageError):
    loop.train(ModelConfig(), **dict(kw, model_dir=str(fresh)))
  assert not fresh.exists()


def test_the_command_prints_one_line_and_exits_2(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "openmoe_jax.main", "--gin_file=models/tiny.gin",
       "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
       "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
       "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.TRAIN_STEPS=2",
       "--gin.BATCH_SIZE=8", "--gin.KEEP_CHECKPOINTS=0"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "openmoe-train: error: KEEP_CHECKPOINTS=0: must be a positive integer")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad,name", [({"eval_steps": 0}, "EVAL_STEPS"),
                                      ({"batch_size": -1}, "BATCH_SIZE"),
                                      ({"num_samples": 0}, "NUM_SAMPLES"),
                                      ({"num_shots": -1}, "NUM_SHOTS"),
                                      ({"no_drop": "yes"}, "EVAL_NO_DROP"),
                                      ({"temperature": -0.5}, "TEMPERATURE"),
                                      ({"top_p": 0.0}, "TOP_P"),
                                      ({"num_examples": 0}, "NUM_EXAMPLES")])
def test_eval_refuses_bad_settings_before_reading_or_writing(tmp_path, bad, name):
  """openmoe-eval's EVAL_STEPS=0 would report the loss of no batch as 0.0 (perplexity 1): a
  perfect model that is not. Refused first, with nothing read or appended."""
  from openmoe_jax.evaluation import checkpoint_eval
  with pytest.raises(UsageError, match=name):
    checkpoint_eval.evaluate_checkpoint(model_dir=str(tmp_path / "nowhere"), **bad)
  assert not (tmp_path / "nowhere").exists()


def test_every_eval_argument_is_in_a_table_or_checked_by_name():
  import inspect
  from openmoe_jax.evaluation import checkpoint_eval
  args = set(inspect.signature(checkpoint_eval.evaluate_checkpoint).parameters)
  explicit = {"model_dir", "mixture_or_task_name", "task_feature_lengths", "split", "step",
              "eval_capacity_factor", "num_examples", "temperature", "top_p"}
  assert args == set(settings.EVAL_SETTINGS) | explicit
