"""The package layout's promises to users: old import paths are the new modules, the gin names
gin files and saved config.gin files bind still exist, and a run directory written before the
move (its files under tests/fixtures/run_v0_1, from the code of commit f7656df) still resumes,
exports and analyses.
"""
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "run_v0_1"

# old documented path -> its module now
ALIASES = {
    "openmoe_jax.checkpoint": "openmoe_jax.training.checkpoint",
    "openmoe_jax.moe": "openmoe_jax.model.moe",
    "openmoe_jax.routing": "openmoe_jax.model.routing",
    "openmoe_jax.decoding": "openmoe_jax.evaluation.decoding",
    "openmoe_jax.export": "openmoe_jax.interop.hf_export",
    "openmoe_jax.train": "openmoe_jax.training.loop",
    "openmoe_jax.optimizer": "openmoe_jax.training.optimizer",
    "openmoe_jax.vocab": "openmoe_jax.data.vocab",
    "openmoe_jax.main": "openmoe_jax.commands.train",
    "openmoe_jax.evaluate": "openmoe_jax.commands.evaluate",
    "openmoe_jax.analyze": "openmoe_jax.commands.analyze",
    "openmoe_jax.baselines": "openmoe_jax.commands.baselines",
    "openmoe_jax.inspect_data": "openmoe_jax.commands.inspect_data",
}


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_an_old_import_path_is_the_new_module(old, new):
  assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_imports_still_work():
  from openmoe_jax.checkpoint import _PositionsHandler  # named in saved _CHECKPOINT_METADATA
  from openmoe_jax.data import make_iterator
  from openmoe_jax.model import DecodeCache, Transformer, compute_loss
  from openmoe_jax.moe import MoeLayer
  from openmoe_jax.optimizer import make_optimizer
  from openmoe_jax.training import checkpoint, optimizer
  from openmoe_jax.data import pipeline
  from openmoe_jax.model import transformer, moe
  assert _PositionsHandler is checkpoint._PositionsHandler
  assert make_iterator is pipeline.make_iterator and make_optimizer is optimizer.make_optimizer
  assert (Transformer, DecodeCache, compute_loss) == (
      transformer.Transformer, transformer.DecodeCache, transformer.compute_loss)
  assert MoeLayer is moe.MoeLayer
  with pytest.raises(AttributeError):
    getattr(importlib.import_module("openmoe_jax.model"), "no_such_name")


def test_the_gin_names_users_bind_are_registered():
  import gin
  from openmoe_jax import gin_utils
  from openmoe_jax.commands import configurables  # noqa: F401
  gin_utils.parse_gin([], [
      "openmoe_jax.evaluate.evaluate_checkpoint.batch_size = 4",
      "openmoe_jax.train.train.eval_steps = 3", "train.seed = 5",
      "openmoe_jax.partitioning.axis_rules.overrides = [('embed', 'data')]",
      "openmoe_jax.vocab.umt5_spm_path.path = '/x'"], finalize=False)
  assert gin.query_parameter("train.eval_steps") == 3
  assert gin.query_parameter("train.seed") == 5
  assert gin.query_parameter("evaluate_checkpoint.batch_size") == 4
  gin.clear_config()


def test_a_saved_config_gin_from_before_the_move_parses():
  from openmoe_jax import gin_utils
  from openmoe_jax.commands import configurables  # noqa: F401
  import tasks  # noqa: F401  the saved file starts with `import tasks`
  gin_utils.parse_gin([str(FIXTURE / "config.gin")], [], finalize=False)
  cfg = gin_utils.model_config()
  saved = json.loads((FIXTURE / "model_config.json").read_text())
  assert {k: getattr(cfg, k) for k in saved} == saved


NEW_MODEL_FIELDS = {"router", "router_score", "routed_scaling_factor", "num_expert_groups",
                    "topk_groups", "balance_loss", "num_shared_experts", "shared_expert_mlp_dim",
                    "shared_expert_gate", "first_k_dense_layers", "moe_layer_freq",
                    "expert_bias_update_rate", "expert_bias", "num_kv_heads", "qk_norm",
                    "attention_scale", "mlp_layout", "moe_extra_mlp", "expert_group_score",
                    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
                    "rope_scaling", "rope_scaling_factor", "rope_original_max_len",
                    "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
                    "attention_impl", "attention_block", "expert_exchange"}


def _old_format(model_dir: pathlib.Path) -> None:
  """Makes a run dir written by today's code look exactly as one from before the move: the
  checkpoint metadata names the handlers by their old import paths, as the fixture's does."""
  old = json.loads((FIXTURE / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
  assert old["data_positions"] == "openmoe_jax.checkpoint._PositionsHandler"
  for meta in model_dir.glob("checkpoints/*/_CHECKPOINT_METADATA"):
    m = json.loads(meta.read_text())
    assert set(m["item_handlers"]) == set(old)
    m["item_handlers"] = old
    meta.write_text(json.dumps(m))
  # model_config.json gained the router, shared-expert and layer-rule fields since; the old
  # run's lacks them, and loading it must give their defaults.
  saved = json.loads((FIXTURE / "model_config.json").read_text())
  ours = json.loads((model_dir / "model_config.json").read_text())
  assert set(ours) - set(saved) == NEW_MODEL_FIELDS and set(saved) <= set(ours)
  (model_dir / "model_config.json").write_text(
      json.dumps({k: v for k, v in ours.items() if k in saved}))
  # run.json gained "batch_size" since; the old run's has only the fixture's keys.
  saved = json.loads((FIXTURE / "run.json").read_text())
  ours = json.loads((model_dir / "run.json").read_text())
  assert set(ours) - set(saved) == {"batch_size"} and set(saved) <= set(ours)
  (model_dir / "run.json").write_text(json.dumps({k: ours[k] for k in saved}))


@pytest.mark.slow
def test_a_run_dir_from_before_the_move_resumes_exports_and_analyses(tmp_path):
  tiny = ["--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
          "--gin.NUM_EMBEDDINGS=8192", "--gin.MIXTURE_OR_TASK_NAME='builtin_mix_full_lm'",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
          "--gin.CHECKPOINT_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.train.progress_bar=False",
          f"--gin.MODEL_DIR='{tmp_path / 'run'}'"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def run(*args):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  run("openmoe_jax.main", *tiny, "--gin.TRAIN_STEPS=1")
  _old_format(tmp_path / "run")
  r = run("openmoe_jax.main", *tiny, "--gin.TRAIN_STEPS=2")
  assert "done at step 2" in r.stderr
  _old_format(tmp_path / "run")
  run("openmoe_jax.commands.export", f"--model_dir={tmp_path / 'run'}",
      f"--output_dir={tmp_path / 'hf'}")
  assert (tmp_path / "hf" / "config.json").exists()
  run("openmoe_jax.analyze", f"--model_dir={tmp_path / 'run'}", "--num_tokens=256",
      "--batch_size=8", "--no_progress", f"--output_dir={tmp_path / 'analysis'}")
  report = json.loads((tmp_path / "analysis" / "routing_report.json").read_text())
  assert report["settings"]["steps"] == [1, 2]


def test_info_compiles_with_the_optimizer_the_gins_bind():
  """openmoe-info --compile plans the run's step: OPTIMIZER and OPTIMIZER_KWARGS as bound (it
  used to compile Adafactor whatever the gins said); AdamW's two moments make the arguments
  larger than Adafactor's factored state."""
  base = [sys.executable, "-m", "openmoe_jax.commands.info", "--gin_file=models/tiny.gin",
          "--gin_file=runs/pretrain.gin", "--compile", "--num_devices=1", "--batch_size=8",
          "--seq_len=32"]
  outs = {}
  kwargs = {"adafactor": "{}",
            "adamw": "{'base_learning_rate': 1e-3, 'warmup_steps': 2, 'decay_steps': 10}"}
  for opt in ("adafactor", "adamw"):
    r = subprocess.run(base + [f"--gin.OPTIMIZER='{opt}'", f"--gin.OPTIMIZER_KWARGS={kwargs[opt]}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    outs[opt] = json.loads(r.stdout)
    assert outs[opt]["optimizer"] == opt
  assert outs["adamw"]["argument_bytes_per_device"] > outs["adafactor"]["argument_bytes_per_device"]
  bad = subprocess.run(base + ["--gin.OPTIMIZER_KWARGS={'no_such_kwarg': 1}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert bad.returncode == 2 and "no_such_kwarg" in bad.stderr.strip().splitlines()[-1]
