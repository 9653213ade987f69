"""openmoe-eval and openmoe-score on a tiny trained model dir."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import _run

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tools") / "run"
  r = _run(d, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=1")
  assert r.returncode == 0, r.stderr[-2000:]
  return d


def _tool(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)


def test_score_matches_the_model_log_softmax(model_dir, tmp_path):
  lines = ["def add(a, b):", "    return a + b  # the sum", "Return the value."]
  inp = tmp_path / "in.txt"
  inp.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
            f"--output_file={out}", "--model_override=no_drop=true", "--step=2")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["text"] for r in rows] == lines
  from openmoe_jax.training import checkpoint
  from openmoe_jax.training import run_dir
  from openmoe_jax.data import vocab
  from openmoe_jax.model.transformer import Transformer
  cfg = run_dir.load_model_config(str(model_dir), ["no_drop=true"])
  params = checkpoint.restore_params(str(model_dir), 2)
  voc = vocab.builtin_vocabulary()
  for row in rows:
    ids = list(voc.encode(row["text"]))
    assert row["token_ids"] == ids and len(row["log_probs"]) == len(ids)
    n = len(ids)
    length = 8 * ((n + 7) // 8)
    inputs = np.zeros((1, length), np.int32)
    inputs[0, 1:n] = ids[:-1]
    logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(inputs))
    lg = np.asarray(logits, np.float64)[0, :n]
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    want = logp[np.arange(n), ids]
    np.testing.assert_allclose(row["log_probs"], want, atol=2e-4)


def test_score_takes_model_settings_as_gin_flags(model_dir, tmp_path):
  """--gin.NO_DROP=True (a model macro) and --gin.ModelConfig.no_drop=True are the t5x spellings
  of --model_override=no_drop=true: the same scores."""
  inp = tmp_path / "in.txt"
  inp.write_text("def add(a, b):\n    return a + b\n")
  outs = []
  for flag in ("--model_override=no_drop=true", "--gin.NO_DROP=True",
               "--gin.ModelConfig.no_drop=True"):
    out = tmp_path / f"{len(outs)}.jsonl"
    r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
              f"--output_file={out}", flag, "--gin.MIN_EXPERT_CAPACITY=1")
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(out.read_text())
  assert outs[0] == outs[1] == outs[2]
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
            f"--output_file={tmp_path / 'x.jsonl'}", "--gin.NO_SUCH_MACRO=1")
  assert r.returncode == 2 and "unsupported gin binding" in r.stderr.strip().splitlines()[-1]


def test_score_bad_input(model_dir, tmp_path):
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", "--input_file=/nope.txt",
            f"--output_file={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2 and "input file not found" in r.stderr
  r = _tool("openmoe_jax.commands.score", f"--model_dir={tmp_path}", f"--input_file={__file__}",
            f"--output_file={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2 and "not an openmoe_jax model dir" in r.stderr
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", "--step=99",
            f"--input_file={__file__}", f"--output_file={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2 and "step 99" in r.stderr
  assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.tmp").exists()
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"def f():\n  return '\xff'\n")
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={bad}",
            f"--output_file={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"openmoe-score: error: {bad}:2: not valid UTF-8 (byte 0xff at column 11)")
  assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.tmp").exists()


def test_eval_reports_loss_perplexity_accuracy(model_dir):
  r = _tool("openmoe_jax.commands.evaluate", f"--gin.MODEL_DIR='{model_dir}'", "--gin.BATCH_SIZE=8",
            "--gin.EVAL_STEPS=2")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(r.stdout)
  assert res["step"] == 2 and res["eval_capacity_factor"] == 2.0
  assert res["eval/perplexity"] == pytest.approx(np.exp(res["eval/loss"]), rel=1e-6)
  assert 0 <= res["eval/token_accuracy"] <= 1 and res["eval/loss"] > 0
  assert (model_dir / "eval_results.jsonl").exists()


def test_tools_fall_back_from_a_damaged_newest_checkpoint_as_a_resume_does(model_dir, tmp_path):
  """Truncated array files in the newest step: openmoe-score (no --step) says so in one line,
  uses the newest checkpoint that reads, and moves nothing; --step=2 names the damage."""
  import shutil
  d = tmp_path / "run"
  shutil.copytree(model_dir, d)
  # Every array file of the step: which one holds the parameters (all a tool reads) depends on
  # how orbax's writer threads interleaved, so damaging only the largest can miss them.
  arrays = list((d / "checkpoints" / "2" / "state").rglob("ocdbt.process_0/d/*"))
  assert arrays
  for a in arrays:
    os.truncate(a, min(100, a.stat().st_size // 2))
  inp = tmp_path / "in.txt"
  inp.write_text("def add(a, b):\n    return a + b\n")
  got, want = tmp_path / "got.jsonl", tmp_path / "want.jsonl"
  r = _tool("openmoe_jax.commands.score", f"--model_dir={d}", f"--input_file={inp}",
            f"--output_file={got}")
  assert r.returncode == 0, r.stderr[-2000:]
  notes = [l for l in r.stderr.splitlines() if "could not be read" in l]
  assert len(notes) == 1 and notes[0].startswith("openmoe-score: checkpoint 2 could not be read")
  assert notes[0].endswith("skipped; using checkpoint 1") and "Traceback" not in r.stderr
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
            f"--output_file={want}", "--step=1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert got.read_text() == want.read_text()
  assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved
  r = _tool("openmoe_jax.commands.score", f"--model_dir={d}", f"--input_file={inp}",
            f"--output_file={tmp_path / 'x.jsonl'}", "--step=2")  # an explicit step: no fallback
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      "openmoe-score: error: checkpoint 2 could not be read")


def test_score_refuses_a_line_over_the_training_length_and_output_over_input(model_dir, tmp_path):
  """The run trained at 32 tokens: a longer line is one line naming it, before any scoring;
  --max_length raises the budget. An --output_file that is the --input_file is refused (for
  openmoe-infer too) and the input is left as it was."""
  inp = tmp_path / "in.txt"
  inp.write_text("short\n" + " ".join(["word"] * 200) + "\n")
  out = tmp_path / "out.jsonl"
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
            f"--output_file={out}")
  assert r.returncode == 2 and not out.exists()
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"openmoe-score: error: {inp}:2: ") and "over the length budget 32" in last
  r = _tool("openmoe_jax.commands.score", f"--model_dir={model_dir}", f"--input_file={inp}",
            f"--output_file={out}", "--max_length=4096")
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(out.read_text().splitlines()) == 2
  before = inp.read_text()
  for module in ("openmoe_jax.commands.score", "openmoe_jax.commands.infer"):
    r = _tool(module, f"--model_dir={model_dir}", f"--input_file={inp}", f"--output_file={inp}")
    assert r.returncode == 2, (module, r.stderr[-2000:])
    assert "--output_file is the --input_file" in r.stderr.strip().splitlines()[-1]
    assert inp.read_text() == before
