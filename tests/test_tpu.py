"""TPU plans with XLA:TPU from libtpu (compile only; no TPU needed): slices, the compiled step's
collectives and memory, `openmoe-train --compile_only`, and one-line errors."""
import json
import math
import os
import pathlib

import jax
import pytest

from openmoe_jax.planning import hlo_stats
from openmoe_jax.commands import info
from openmoe_jax.commands import train as train_main
from openmoe_jax.training import steps
from openmoe_jax.planning import tpu
from openmoe_jax.planning import plan as tpu_plan
from openmoe_jax.training.optimizer import make_optimizer

needs_libtpu = pytest.mark.skipif(not tpu.libtpu_installed(),
                                  reason="needs libtpu (pip install 'openmoe_jax[tpu]')")
TINY = ["--gin_file=models/tiny.gin", "--seq_len=128"]


@pytest.mark.parametrize("name, topology, devices, hbm_gib", [
    ("v3-256", "v3:8x16", 256, 16), ("v3-512", "v3:16x16", 512, 16), ("v3-8", "v3:2x2", 8, 16),
    ("v2-32", "v2:4x4", 32, 8), ("v4-8", "v4:2x2x1", 8, 16), ("v4-256", "v4:4x4x8", 256, 16),
    ("v5p-256", "v5p:4x4x8", 128, 95), ("v5p-16", "v5p:2x2x2", 8, 95),
    ("v5litepod-16", "v5e:4x4", 16, 16), ("v6e-128", "v6e:8x16", 128, 32),
    ("v4:4x4x4", "v4:4x4x4", 128, 16), ("v6e:2x4", "v6e:2x4", 8, 32),
])
def test_parse_slice(name, topology, devices, hbm_gib):
  s = tpu.parse_slice(name)
  assert (s.topology, s.num_devices, s.hbm_bytes_per_device) == (topology, devices,
                                                                  hbm_gib * 2**30)
  assert tpu.parse_slice(tpu.accelerator_type(s)).topology == topology


@pytest.mark.parametrize("bad", ["v9-8", "v3-12", "v3-2", "v5litepod-1", "v4:4x4", "tpu"])
def test_parse_slice_rejects(bad):
  with pytest.raises(Exception, match="--tpu="):
    tpu.parse_slice(bad)


def test_quiet_cpu_default_only_without_a_tpu(monkeypatch):
  monkeypatch.setattr(tpu, "libtpu_installed", lambda: True)
  monkeypatch.setattr(tpu, "tpu_attached", lambda: False)
  env = {}
  tpu.quiet_cpu_default(env)
  assert env == {"JAX_PLATFORMS": "cpu"}
  env = {"JAX_PLATFORMS": "tpu"}
  tpu.quiet_cpu_default(env)
  assert env == {"JAX_PLATFORMS": "tpu"}  # the user's choice wins
  monkeypatch.setattr(tpu, "tpu_attached", lambda: True)
  env = {}
  tpu.quiet_cpu_default(env)
  assert env == {}  # a TPU VM keeps JAX's own backend search


def test_auto_choices_follow_the_compiled_estimates():
  from openmoe_jax.model import grouped
  from openmoe_jax.model import moe
  from openmoe_jax.planning import target
  assert grouped.resolve("auto") == "blocked" and moe.resolve_dispatch("auto") == "gather"  # CPU
  with target.compiling_for("tpu"):
    assert grouped.resolve("auto") == "ragged_dot" and moe.resolve_dispatch("auto") == "gather"
    assert grouped.resolve("pallas") == "pallas"


def test_collectives_count_loop_bodies_by_trip_count():
  hlo = """HloModule m

%cond (p: (s32[])) -> pred[] {
  %c = s32[] constant(4)
  %p = (s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[])) -> (s32[]) {
  %a2a = bf16[8,128]{1,0} all-to-all(bf16[8,128]{1,0} %x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  ROOT %t = (s32[]) tuple(%i)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[]) while(%init), condition=%cond, body=%body
  %ars = f32[16]{0} all-reduce-start(f32[16]{0} %a), to_apply=%add
  %ard = f32[16]{0} all-reduce-done(f32[16]{0} %ars)
  ROOT %ag = (f32[16]{0}, bf16[4]{0}) all-gather(%a, %b), dimensions={0}
}
"""
  stats = hlo_stats.collectives(hlo)
  assert stats["all-to-all"] == {"count": 4, "bytes": 4 * 8 * 128 * 2}
  assert stats["all-reduce"] == {"count": 1, "bytes": 64}  # the -done only
  assert stats["all-gather"] == {"count": 1, "bytes": 64 + 8}
  assert [op["group_size"] for op in hlo_stats.collective_ops(hlo) if op["kind"] == "all-to-all"
          ] == [4]


@pytest.fixture(scope="module")
def tiny_plan():
  """The tiny model's step on v4:2x2x1 (8 devices), mesh data 1 x expert 4 x model 2."""
  from openmoe_jax import gin_utils  # noqa: F401
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin(["models/tiny.gin"], [], finalize=False)
  cfg = gin_utils.model_config()
  plan = tpu_plan.plan(cfg, "v4:2x2x1", num_expert_partitions=4, num_model_partitions=2,
                       batch_size=16, seq_len=128, num_microbatches=2, with_hlo=True)
  return cfg, plan


@needs_libtpu
def test_tiny_step_compiles_for_a_v4_expert_by_model_mesh(tiny_plan):
  cfg, plan = tiny_plan
  assert plan["backend"] == "tpu" and plan["device_kind"] == "TPU v4"
  assert plan["num_devices"] == 8 and plan["mesh"] == {"data": 1, "expert": 4, "model": 2}
  for key in ("hbm_bytes_per_device", "peak_bytes_per_device", "argument_bytes_per_device",
              "temp_bytes_per_device", "estimated_step_seconds", "estimated_tokens_per_second",
              "estimated_mfu", "xla_flops_per_device", "headroom_bytes"):
    assert plan[key] > 0, key
  assert plan["fits"] and 0 < plan["headroom_fraction"] < 1
  assert "compiler estimate" in plan["estimate_note"]
  # The whole step: two microbatches' forward and backward plus one update.
  assert plan["estimated_step_seconds"] > plan["estimated_update_seconds"] > 0
  assert set(plan["collectives"]) == set(hlo_stats.KINDS)
  ops = hlo_stats.collective_ops(plan["hlo"])
  a2a = [op for op in ops if op["kind"] == "all-to-all"]
  assert any(op["group_size"] == 4 for op in a2a), "no all-to-all over the expert axis"
  assert plan["collectives"]["all-to-all"]["count"] == sum(op["runs"] for op in a2a) > 0
  # The token exchanges are in the microbatch loop, which runs twice.
  assert all(op["runs"] == 2 for op in a2a if op["group_size"] == 4)
  tokens = 16 // 2 * 128
  for op in ops:
    if op["kind"] == "all-gather":
      dims = [math.prod(int(d) for d in dims.split(",") if d) for dims in
              __import__("re").findall(r"\[([0-9,]*)\]", op["shape"])]
      assert max(dims) < tokens * cfg.emb_dim, f"token batch all-gathered: {op['shape']}"
      assert not op["shape"].split("[")[1].startswith(f"{cfg.num_experts},"), op["shape"]


TPU_ENV = ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE",
           "ALLOW_MULTIPLE_LIBTPU_LOAD")


@needs_libtpu
def test_with_data_parallelism_expert_weights_and_buffers_are_never_all_gathered(monkeypatch):
  """Mesh data 4 x expert 2: the expert FFN stays expert-major, so its weight gradients are
  summed over `data` (all-reduce) and nothing is all-gathered (before the expert output was
  constrained, XLA gathered every expert's `wo` forward and the expert buffers backward)."""
  from openmoe_jax import gin_utils  # noqa: F401
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin(["models/tiny.gin"], [], finalize=False)
  cfg = gin_utils.model_config()
  for k in TPU_ENV:
    monkeypatch.delenv(k, raising=False)
  plan = tpu_plan.plan(cfg, "v4:2x2x1", num_expert_partitions=2, num_model_partitions=1,
                       batch_size=8, seq_len=128, with_hlo=True)
  assert plan["mesh"] == {"data": 4, "expert": 2, "model": 1}
  # What libtpu was told for the compile is not left in the process's environment.
  assert not any(k in os.environ for k in TPU_ENV)
  assert plan["collectives"]["all-gather"] == {"count": 0, "bytes": 0}
  ops = hlo_stats.collective_ops(plan["hlo"])
  assert any(op["kind"] == "all-to-all" and op["group_size"] == 2 for op in ops)
  # The expert kernels' gradients: an all-reduce over the 4 data replicas, of one expert shard.
  e_local = cfg.num_experts // 2
  assert any(op["kind"] == "all-reduce" and op["group_size"] == 4 and
             op["shape"].split("[")[1].startswith(f"{e_local},") for op in ops), ops


def _run_gin(tmp_path: pathlib.Path) -> pathlib.Path:
  gin = tmp_path / "run.gin"
  gin.write_text(f"""include 'models/tiny.gin'
include 'runs/pretrain.gin'
MODEL_DIR = '{tmp_path / "model_dir"}'
MIXTURE_OR_TASK_NAME = 'builtin_mix_full_lm'
TASK_FEATURE_LENGTHS = {{'targets': 64}}
TRAIN_STEPS = 1
BATCH_SIZE = 16
NUM_MICROBATCHES = 2
NUM_EXPERT_PARTITIONS = 4
NUM_MODEL_PARTITIONS = 2
OPTIMIZER = 'adafactor'
""")
  return gin


@needs_libtpu
def test_compile_only_plans_exactly_the_runs_step(tmp_path, capsys):
  gin = _run_gin(tmp_path)
  assert train_main.main([f"--gin_file={gin}", "--compile_only", "--tpu=v4:2x2x1"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert not (tmp_path / "model_dir").exists()  # nothing written
  assert (out["batch_size"], out["seq_len"], out["num_microbatches"]) == (16, 64, 2)
  assert out["mesh"] == {"data": 1, "expert": 4, "model": 2} and out["optimizer"] == "adafactor"
  # The state the CPU run builds (train.py: init_state at the microbatch size, Adafactor):
  # its bytes, split over the 8 devices as the plan's mesh splits them, are the plan's arguments.
  from openmoe_jax import gin_utils
  from openmoe_jax.training import state_layout as layout
  from openmoe_jax.model import partitioning
  cfg = gin_utils.model_config().replace(num_expert_replicas=1)
  tx, _ = make_optimizer("adafactor", param_axes=steps.param_axes(cfg))
  mesh = partitioning.make_mesh(4, 2)  # the 8 fake CPU devices of conftest
  _, abstract = layout.state_layout(lambda r: steps.init_state(cfg, tx, r, 8, 64), mesh,
                                    jax.random.key(0))
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"]))
  assert out["num_params"] == n_params
  assert out["state_shapes_digest"] == tpu_plan.shapes_digest(abstract)


def _error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  return err[-1] if err else ""


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--tpu=v9-8"], "unknown accelerator type"),
    (["--tpu=v4:2x2x1", "--num_model_partitions=3"], "cannot be split"),
    (["--tpu=v4:2x2x1", "--num_expert_partitions=4", "--gin.NUM_EXPERTS=6"], "not divisible"),
    (["--tpu=v4:2x2x1", "--num_expert_partitions=4", "--batch_size=6"], "must be divisible"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
  assert info.main(TINY + args) == 2
  line = _error(capsys)
  assert line.startswith("openmoe-info: error:") and message in line, line


@needs_libtpu
def test_compile_only_bad_mesh_exit_2_nothing_written(tmp_path, capsys):
  gin = _run_gin(tmp_path)
  assert train_main.main([f"--gin_file={gin}", "--compile_only", "--tpu=v3-8",
                          "--gin.NUM_MODEL_PARTITIONS=3"]) == 2
  assert "cannot be split" in _error(capsys)
  assert not (tmp_path / "model_dir").exists()


def test_tpu_without_libtpu_names_the_extra(monkeypatch, capsys):
  monkeypatch.setattr(tpu, "libtpu_installed", lambda: False)
  assert info.main(TINY + ["--tpu=v4-8"]) == 2
  line = _error(capsys)
  assert "libtpu" in line and "openmoe_jax[tpu]" in line, line


@needs_libtpu
def test_a_step_that_does_not_fit_exits_3(capsys):
  assert info.main(TINY + ["--tpu=v4:2x2x1", "--num_expert_partitions=4", "--batch_size=8",
                           "--memory_budget_gib=0.001"]) == 3
  captured = capsys.readouterr()
  assert json.loads(captured.out)["fits"] is False
  last = captured.err.strip().splitlines()[-1]
  assert last.startswith("openmoe-info: error: per-device peak") and "budget" in last


def test_plain_cpu_run_prints_no_tpu_start_up(tmp_path):
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("from openmoe_jax.commands import cli; cli.start_command([]); import jax; "
          "print(jax.devices())")
  proc = subprocess.run([sys.executable, "-c", code],
                        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
  assert proc.returncode == 0 and "CpuDevice" in proc.stdout
  assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr


def test_estimated_cycles_sum_every_computation_and_the_loop_bodies():
  hlo = """HloModule m

%body (p: (s32[])) -> (s32[]) {
  %a = f32[4]{0} add(%x, %y), backend_config={"estimated_cycles":"30"}
  ROOT %t = (s32[]) tuple(%a), backend_config={"estimated_cycles":"5"}
}

ENTRY %main (p: s32[]) -> s32[] {
  %w = (s32[]) while(%i), condition=%cond, body=%body, backend_config={"estimated_cycles":"2"}
  ROOT %r = s32[] get-tuple-element(%w), index=0, backend_config={"estimated_cycles":"1"}
}
"""
  assert hlo_stats.estimated_cycles(hlo) == {"total": 38, "loop_body": 35}


@needs_libtpu
def test_attention_remat_drops_the_attention_probabilities_for_one_more_qk_matmul():
  """REMAT_POLICY='attention' on XLA:TPU: the step's temporaries shrink by about the attention
  probabilities of every layer, and the compiled FLOPs grow by at most one q k^T per layer."""
  from openmoe_jax import gin_utils  # noqa: F401
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin(["models/tiny.gin"], ["ACTIVATION_DTYPE='bfloat16'"], finalize=False)
  cfg = gin_utils.model_config().replace(num_layers=4)
  seq, batch = 2048, 16
  plans = {pol: tpu_plan.plan(cfg.replace(remat_policy=pol), "v4:2x2x1", num_expert_partitions=4,
                              num_model_partitions=2, batch_size=batch, seq_len=seq)
           for pol in ("none", "attention")}
  none, att = plans["none"], plans["attention"]
  # Per device: batch / expert rows, heads / model heads, [T, T] bf16 probabilities per layer.
  probs = batch // 4 * (cfg.num_heads // 2) * seq * seq * 2 * cfg.num_layers
  saved = none["temp_bytes_per_device"] - att["temp_bytes_per_device"]
  # (one or two layers' probabilities are live again while the backward recomputes them)
  assert saved >= 0.5 * probs, (saved, probs)
  qk = 2 * batch // 4 * (cfg.num_heads // 2) * seq * seq * cfg.head_dim * cfg.num_layers
  extra = att["xla_flops_per_device"] - none["xla_flops_per_device"]
  assert 0 < extra <= 1.25 * qk, (extra, qk)


@needs_libtpu
@pytest.mark.parametrize("slice_name", ["v5p-16", "v6e-8"])
def test_v5p_and_v6e_steps_get_the_cost_models_time_not_a_roofline(slice_name):
  """XLA offloads scatters to the SparseCore on v5p/v6e and its cost model then times nothing
  (optimal_seconds -4): no scatter in the step is offloaded there, so the whole-step time is
  the compiler's estimate there too."""
  from openmoe_jax import gin_utils  # noqa: F401
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
  gin_utils.parse_gin(["models/tiny.gin"], ["ACTIVATION_DTYPE='bfloat16'"], finalize=False)
  cfg = gin_utils.model_config()
  plan = tpu_plan.plan(cfg, slice_name, num_expert_partitions=4, num_model_partitions=2,
                       batch_size=16, seq_len=256, num_microbatches=2, with_hlo=True)
  assert plan["estimate_method"] == "xla optimal_seconds", plan["estimate_method"]
  assert plan["estimated_step_seconds"] > plan["estimated_update_seconds"] > 0
  assert 0 < plan["estimated_mfu"] < 1
  assert 'execution_thread="sparsecore"' not in plan["hlo"]


def test_importing_the_package_leaves_jax_and_the_environment_alone(tmp_path):
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("import os, openmoe_jax, openmoe_jax.model, openmoe_jax.training.loop; "
          "print(os.environ.get('JAX_PLATFORMS'))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "None"
