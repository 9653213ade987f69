"""MODEL_DIR files on a URL (TensorFlow's in-memory ram:// filesystem) and on a local path.

A gs:// model dir on a TPU pod must get metrics.jsonl, model_config.json, config.gin, run.json
and the TensorBoard events, never a local `./gs:/...` folder. ram:// goes through the same
tf.io.gfile layer. orbax (etils.epath) does not know ram://, so the writers are tested directly,
not a whole training run.
"""
import dataclasses
import json
import os
import uuid

import pytest
import tensorflow as tf

from openmoe_jax import fs
from openmoe_jax.training import run_dir
from openmoe_jax.training import loop as train
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.training.metrics_writer import MetricsWriter

gfile = tf.io.gfile
RUN_FILES = {"metrics.jsonl", "model_config.json", "config.gin", "run.json", "tensorboard"}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  """An empty working directory, where a misrouted URL would create `ram:/...`."""
  d = tmp_path / "cwd"
  d.mkdir()
  monkeypatch.chdir(d)
  return d


@pytest.fixture
def url():
  return f"ram://model_dir_test/{uuid.uuid4().hex}/run"


def _rows(text):
  return [json.loads(l) for l in text.splitlines()]


def _write_run(model_dir, cfg, steps):
  run_dir.check_model_dir(model_dir, cfg)
  run_dir.write_run_files(model_dir, "builtin_corpus_full_lm", {"targets": 16},
                        operative_config="BATCH_SIZE = 8\n", model_config=cfg)
  w = MetricsWriter(model_dir)
  for s in steps:
    w.write(s, {"loss": 1.0 / s, "moe/expert_load": [0.25, 0.75]})
  w.close()


def test_fs_paths():
  assert fs.is_url("gs://b/run") and fs.is_url("ram://x") and not fs.is_url("/tmp/run")
  assert fs.join("gs://b/run", "tensorboard", "train") == "gs://b/run/tensorboard/train"
  assert fs.join("runs/q", "run.json") == os.path.join("runs/q", "run.json")
  assert fs.abspath("gs://b/run") == "gs://b/run"
  assert fs.abspath("runs/q") == os.path.abspath("runs/q")


def test_run_files_on_a_url(url, cwd):
  cfg = ModelConfig(num_layers=4)
  _write_run(url, cfg, [10, 20])
  names = set(fs.listdir(url))
  assert names == RUN_FILES, names  # no *.tmp left behind
  rows = _rows(gfile.GFile(f"{url}/metrics.jsonl").read())
  assert rows == [{"step": 10, "loss": 0.1, "moe/expert_load": [0.25, 0.75]},
                  {"step": 20, "loss": 0.05, "moe/expert_load": [0.25, 0.75]}]
  assert json.loads(gfile.GFile(f"{url}/model_config.json").read()) == json.loads(
      json.dumps(dataclasses.asdict(cfg)))
  assert gfile.GFile(f"{url}/config.gin").read() == "BATCH_SIZE = 8\n"
  assert gfile.glob(f"{url}/tensorboard/train/events.out.tfevents.*")
  # The readers of a model dir (openmoe-eval, -score, -analyze, -export) find them there.
  assert run_dir.load_model_config(url) == cfg
  assert run_dir.run_info(url) == {"mixture_or_task_name": "builtin_corpus_full_lm",
                                        "task_feature_lengths": {"targets": 16}}
  assert run_dir.batch_size(url) == 8  # run.json has no batch_size here: config.gin's
  assert not os.listdir(cwd)


def test_tensorboard_events_on_a_url_are_readable(url, cwd):
  w = MetricsWriter(url)
  w.write(3, {"loss": 2.5})
  w.close()
  path, = gfile.glob(f"{url}/tensorboard/train/events.out.tfevents.*")
  values = [(e.step, v.tag, v.simple_value) for e in tf.compat.v1.train.summary_iterator(path)
            for v in e.summary.value]
  assert values == [(3, "loss", 2.5)]
  assert not os.listdir(cwd)


def test_metrics_on_a_url_survive_a_resume(url, cwd):
  first = MetricsWriter(url, flush_secs=0)  # rewrites the file at every write
  for s in (1, 2):
    first.write(s, {"loss": float(s)})
    assert [r["step"] for r in _rows(fs.read_text(f"{url}/metrics.jsonl"))] == list(range(1, s + 1))
  first.close()
  resumed = MetricsWriter(url)  # default: at most once a minute, and on flush / close
  resumed.write(3, {"loss": 3.0})
  resumed.write(4, {"loss": 4.0})
  assert [r["step"] for r in _rows(fs.read_text(f"{url}/metrics.jsonl"))] == [1, 2]
  resumed.flush()
  assert [r["step"] for r in _rows(fs.read_text(f"{url}/metrics.jsonl"))] == [1, 2, 3, 4]
  resumed.write(5, {"loss": 5.0})
  resumed.close()
  assert _rows(fs.read_text(f"{url}/metrics.jsonl")) == [
      {"step": s, "loss": float(s)} for s in range(1, 6)]
  assert not fs.exists(f"{url}/metrics.jsonl.tmp")
  assert not os.listdir(cwd)


def test_disabled_writer_writes_nothing(url, cwd):
  w = MetricsWriter(url, enabled=False)
  w.write(1, {"loss": 1.0})
  w.flush()
  w.close()
  assert not fs.exists(url)
  assert not os.listdir(cwd)


def test_append_text_on_a_url(url, cwd):
  path = fs.join(url, "eval_results.jsonl")  # how openmoe-eval records each evaluation
  fs.makedirs(url)
  fs.append_text(path, '{"step": 1}\n')
  fs.append_text(path, '{"step": 2}\n')
  assert fs.read_text(path) == '{"step": 1}\n{"step": 2}\n'
  assert fs.listdir(url) == ["eval_results.jsonl"]
  assert not os.listdir(cwd)


def test_local_model_dir_keeps_its_files(tmp_path, cwd):
  local = tmp_path / "run"
  cfg = ModelConfig()
  _write_run(str(local), cfg, [10])
  assert set(os.listdir(local)) == RUN_FILES
  assert json.loads((local / "model_config.json").read_text()) == json.loads(
      json.dumps(dataclasses.asdict(cfg)))
  assert (local / "model_config.json").read_text() == json.dumps(dataclasses.asdict(cfg),
                                                                  indent=1)
  assert json.loads((local / "run.json").read_text())["task_feature_lengths"] == {"targets": 16}
  assert (local / "config.gin").read_text() == "BATCH_SIZE = 8\n"
  assert list((local / "tensorboard" / "train").iterdir())
  # Locally each row is appended as it is written, also after a resume; no buffering.
  w = MetricsWriter(str(local))
  w.write(20, {"loss": 0.5})
  assert [r["step"] for r in _rows((local / "metrics.jsonl").read_text())] == [10, 20]
  w.close()
  assert run_dir.load_model_config(str(local)) == cfg
  assert not os.listdir(cwd)


def test_relative_local_model_dir(cwd):
  _write_run("runs/q", ModelConfig(), [1])
  assert set(os.listdir(cwd / "runs" / "q")) == RUN_FILES


def test_a_row_cut_by_a_kill_does_not_swallow_the_next_run_s_rows(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed in the middle of a row
  w = MetricsWriter(str(tmp_path))
  w.write(2, {"loss": 1.5})
  w.close()
  lines = path.read_text().splitlines()
  assert lines[-1] == '{"step": 2, "loss": 1.5}' and lines[-2] == '{"step": 2, "lo'
  w = MetricsWriter(str(tmp_path))  # a clean end is left alone
  w.close()
  assert path.read_text().splitlines() == lines
