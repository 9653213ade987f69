"""benchmarks/cpu_longest_sequence.py on the tiny model with a tiny budget: the dense search
stops where its T^2 logits pass the budget, chunked goes further, and a real step runs."""
import json
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_longest_sequence.py"


def test_chunked_trains_longer_sequences_than_dense_in_the_same_budget(tmp_path):
  gin = tmp_path / "tiny_run.gin"
  gin.write_text("include 'quickstart.gin'\ninclude 'models/tiny.gin'\n")
  r = subprocess.run([sys.executable, str(BENCH), "--gin_file", str(gin), "--min_len", "512",
                      "--max_len", "1024", "--budget_gib", "0.02", "--run_max_len", "512"],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  rows, summary = lines[:-1], lines[-1]
  peak = {(x["attention_impl"], x["seq_len"]): x["peak_gib"] for x in rows}
  assert peak[("dense", 1024)] > 0.02 >= peak[("dense", 512)]
  assert peak[("chunked", 1024)] <= 0.02 < peak[("dense", 1024)]
  assert peak[("dense", 1024)] > 1.5 * peak[("chunked", 1024)]
  assert summary["longest"]["dense"]["seq_len"] == 512
  assert summary["longest"]["chunked"]["seq_len"] == 1024
  for impl in ("dense", "chunked"):
    assert summary["longest"][impl]["ran_at"] == 512
    assert summary["longest"][impl]["one_step_seconds"] > 0
