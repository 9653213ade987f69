"""benchmarks/tpu_plan.py's whole-depth extrapolation (`--extrapolate`) on synthetic probe rows
(no compile): linear quantities come out exactly, fits / MFU are recomputed from them, a middle
probe checks the line, and the named Mixtral cases expand to gins that parse."""
import importlib.util
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
  sys.path.insert(0, str(BENCH))  # tpu_plan imports its sibling `cases`
  try:
    spec = importlib.util.spec_from_file_location("tpu_plan_bench", BENCH / "tpu_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(BENCH))
  return module


def _row(case, layers, *, bend=0.0):
  """A probe row whose additive quantities are fixed + layers x per-layer (+ bend at 2)."""
  lin = lambda fixed, per: fixed + layers * per + (bend if layers == 2 else 0.0)
  return {"case": f"{case} NUM_DECODER_LAYERS={layers} NUM_DECODER_SPARSE_LAYERS={layers}",
          "num_layers": layers, "accelerator_type": "v5p-128", "num_devices": 64,
          "mesh": {"data": 8, "expert": 8, "model": 1}, "batch_size": 512, "seq_len": 1024,
          "num_microbatches": 1, "hbm_bytes_per_device": 90e9,
          "peak_bf16_flops_per_device": 459e12, "estimate_method": "roofline",
          "argument_bytes_per_device": lin(1e9, 2e9), "temp_bytes_per_device": lin(3e9, 1e9),
          "peak_bytes_per_device": lin(4e9, 3e9), "estimated_step_seconds": lin(0.01, 0.1),
          "roofline_step_seconds": lin(0.01, 0.1), "xla_flops_per_device": lin(1e12, 5e13),
          "xla_bytes_accessed_per_device": lin(1e10, 1e11),
          "model_flops_per_step": lin(4e14, 1.3e15), "num_params": lin(2.6e8, 1.45e9),
          "collectives": {"all-to-all": {"count": lin(0, 8), "bytes": lin(0, 1.6e9)}}}


def test_two_probes_give_the_whole_depth_row(bench):
  a, b = _row("m v5p-128", 1), _row("m v5p-128", 4)
  row = bench.extrapolate_rows(a, b, 32)
  assert row["num_layers"] == 32 and row["probe_layers"] == [1, 4]
  assert row["peak_bytes_per_device"] == pytest.approx(4e9 + 32 * 3e9)
  assert row["peak_bytes_per_device_per_layer"] == pytest.approx(3e9)
  assert row["peak_bytes_per_device_fixed"] == pytest.approx(4e9)
  assert row["estimated_step_seconds"] == pytest.approx(0.01 + 32 * 0.1)
  assert row["collectives"]["all-to-all"]["bytes"] == pytest.approx(32 * 1.6e9)
  assert row["fits"] is False  # 100 GB peak > 90 GB HBM
  assert row["headroom_fraction"] == pytest.approx(1 - 100e9 / 90e9)
  flops = 4e14 + 32 * 1.3e15
  assert row["estimated_mfu"] == pytest.approx(flops / (3.21 * 64 * 459e12))
  assert row["estimated_tokens_per_second"] == pytest.approx(512 * 1024 / 3.21)
  assert "compiler estimate" in row["note"] and "extrapolated" in row["note"]


def test_extrapolate_groups_by_case_and_checks_the_line_at_a_middle_depth(bench, tmp_path,
                                                                         monkeypatch):
  monkeypatch.setattr(bench, "full_depth", lambda case: 32)
  path = tmp_path / "probes.jsonl"
  rows = [_row("m v5p-128", n, bend=0.05) for n in (1, 2, 4)] + [
      _row("other v5p-128", 1), {"case": "broken v5p-128", "error": "boom"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = bench.extrapolate(str(path))
  assert len(out) == 1  # 'other' has one depth, 'broken' none
  check = out[0]["linearity_check_at_2_layers"]["estimated_step_seconds"]
  assert check["line"] == pytest.approx(0.01 + 2 * 0.1)
  assert check["compiled"] == pytest.approx(0.01 + 2 * 0.1 + 0.05)
  assert out[0]["probe_cases"][0].endswith("NUM_DECODER_LAYERS=1 NUM_DECODER_SPARSE_LAYERS=1")


def test_named_mixtral_cases_expand_to_gins_of_the_full_model(bench):
  names = [n for n in bench.NAMED if n.startswith("mixtral_v5p128_fsdp8_ep8_probe")]
  assert names == ["mixtral_v5p128_fsdp8_ep8_probe1", "mixtral_v5p128_fsdp8_ep8_probe2",
                   "mixtral_v5p128_fsdp8_ep8_probe4"]
  assert "NUM_DECODER_LAYERS=2" in bench.NAMED[names[1]]
  assert bench.full_depth(names[1]) == 32  # Mixtral-8x7B's own depth, from its gin
