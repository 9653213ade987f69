"""benchmarks/moe_layer.py --fine-grained at tiny sizes: the documented JSON keys, and the same
active FLOPs per token in every row (dense, reference top-2, top-8 at several E). The layers are
built, initialised and routed (the dropped fraction is measured), but the timed steps are
skipped (`_median_seconds` stubbed): compiling every row's forward+backward takes ~25 s here,
and each top-8 row's forward alone ~4 s on 2 cores, so the run has one fine row; the default
set (E = 64, 128, 256) is checked without running it."""
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "moe_layer.py"
TINY = ["--fine-grained", "--tokens", "256", "--seq-len", "128", "--group-size", "128",
        "--d-model", "32", "--expert-dim", "32", "--ref-experts", "4", "--fine-experts", "16",
        "--repeats", "1", "--peak-n", "64"]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("moe_layer_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fine_grained_rows_share_the_active_flops(bench, capsys, monkeypatch):
  steps = []
  monkeypatch.setattr(bench, "_median_seconds",
                      lambda fn, args, repeats, warmup=1: steps.append(fn) or 0.5 + len(steps))
  result = bench.main(TINY)
  assert len(steps) == 1 + 1 + 2  # the peak matmul, the dense FFN, two MoE rows
  assert '"case_set": "fine_grained"' in capsys.readouterr().out
  assert {"peak_matmul_flops_per_s", "dense", "configs", "active_rule"} <= set(result)
  dense = result["dense"]
  assert dense["hidden"] == 2 * 32
  assert [(c["name"], c["experts"], c["top_k"], c["expert_mlp_dim"]) for c in result["configs"]] \
      == [("top2_e4", 4, 2, 32), ("top8_e16", 16, 8, 8)]
  for row in result["configs"]:
    assert row["active_flops_per_token"] == dense["active_flops_per_token"] == 8 * 32 * 64
    assert row["router_flops_per_token"] == 2 * 32 * row["experts"]
    run = row["dropless"]
    assert {"seconds", "useful_flops", "flops_per_s", "us_per_token", "dropped_fraction",
            "ratio_to_dense", "seconds_ratio_to_dense"} <= set(run)
    assert run["dropped_fraction"] == 0.0
    assert run["ratio_to_dense"] == pytest.approx(run["flops_per_s"] / dense["flops_per_s"])
    assert run["seconds_ratio_to_dense"] == pytest.approx(run["seconds"] / dense["seconds"])
    # useful FLOPs x3 (forward+backward): the router plus every assignment's expert matmuls
    assert run["useful_flops"] == 3 * 256 * (row["router_flops_per_token"]
                                             + row["active_flops_per_token"])


def test_default_fine_grained_set_keeps_the_active_flops(bench):
  args = bench.argparse.Namespace(top_k=2, expert_dim=1024, fine_top_k=8, ref_experts=16,
                                  fine_experts="64,128,256", d_model=512, capacity_factor=1.25,
                                  group_size=4096, dtype="float32", ep_buffer_factor=2.0)
  rows = [bench.row_info(name, bench.case_config(args, e, k, f))
          for name, e, k, f in bench.fine_grained_rows(args)]
  assert [(r["name"], r["expert_mlp_dim"]) for r in rows] == [
      ("top2_e16", 1024), ("top8_e64", 256), ("top8_e128", 256), ("top8_e256", 256)]
  assert {r["active_flops_per_token"] for r in rows} == {8 * 512 * 2048}
  assert rows[0]["expert_params"] == rows[1]["expert_params"]  # E=64 splits each expert in 4


def test_fine_width_must_keep_the_active_width(bench):
  with pytest.raises(SystemExit):
    bench.main(TINY + ["--fine-top-k", "3"])  # 2 x 32 is not a multiple of 3
