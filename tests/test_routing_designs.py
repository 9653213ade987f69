"""Every routing design gin under gin/routing/ trains 2 steps on the tiny model through
openmoe-train and round-trips through openmoe-export / openmoe-import bitwise: the Hugging Face
layout where it holds the design (`name_map.unexportable`), else t5x's."""
import json
import pathlib

import jax
import numpy as np
import pytest

from openmoe_jax.commands import export as export_cmd
from openmoe_jax.commands import import_model as import_cmd
from openmoe_jax.commands import train as train_cmd
from openmoe_jax.interop.hf import name_map
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.training import checkpoint as ckpt_lib

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"
DESIGNS = sorted(p.name for p in (GIN_DIR / "routing").glob("*.gin"))
# Fine-grained-ready tiny sizes: one MoE layer of 16 experts of width 16 (DeepSeek-V3's 8
# groups of 2, top 4 groups: 8 experts to choose 8 from).
MODEL = ["--gin_file=models/tiny.gin", "--gin.NUM_EMBEDDINGS=8192", "--gin.NUM_EXPERTS=16",
         "--gin.EXPERT_MLP_DIM=16", "--gin.NUM_DECODER_LAYERS=1",
         "--gin.NUM_DECODER_SPARSE_LAYERS=1"]


def _params(model_dir):
  step = ckpt_lib.list_steps(str(model_dir))[-1]
  return ckpt_lib.restore_params(str(model_dir), step)


def test_the_designs_are_there():
  assert {"openmoe_dropless.gin", "mixtral.gin", "olmoe.gin", "qwen3_moe.gin",
          "deepseek_v3.gin", "expert_choice.gin"} <= set(DESIGNS)


@pytest.mark.parametrize("design", DESIGNS)
def test_a_routing_design_trains_two_steps_and_round_trips_through_export(design, tmp_path):
  run, out, back = tmp_path / "run", tmp_path / "export", tmp_path / "back"
  gin = [*MODEL, f"--gin_file=routing/{design}"]
  assert train_cmd.main([*gin, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{run}'",
                         "--gin.MIXTURE_OR_TASK_NAME='builtin_corpus_full_lm'",
                         "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
                         "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=0",
                         "--gin.train.progress_bar=False", "--gin.train.log_period=1"]) == 0
  cfg = ModelConfig(**json.loads((run / "model_config.json").read_text()))
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  losses = {r["step"]: r for r in rows if "loss" in r}
  assert sorted(losses) == [1, 2] and all(np.isfinite(r["loss"]) for r in losses.values())
  if cfg.expert_bias:  # two updates of the loss-free bias, each of +-rate per expert
    assert losses[2]["moe/expert_bias_abs_max"] == pytest.approx(
        2 * cfg.expert_bias_update_rate, rel=1e-5) or losses[2]["moe/expert_bias_abs_max"] == 0
    assert losses[1]["moe/expert_bias_abs_max"] == pytest.approx(cfg.expert_bias_update_rate)

  hf = not name_map.unexportable(cfg)
  assert export_cmd.main([f"--model_dir={run}", f"--output_dir={out}",
                          f"--format={'hf' if hf else 't5x'}"]) == 0
  source = [f"--hf_dir={out}"] if hf else [f"--t5x_checkpoint={out / 'checkpoint_2'}", *gin]
  assert import_cmd.main([*source, f"--model_dir={back}"]) == 0
  a, b = _params(run), _params(back)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)
  got = ModelConfig(**json.loads((back / "model_config.json").read_text()))
  assert name_map.shape_mismatch(got, cfg) == []
  assert (got.router, got.router_score, got.num_selected_experts) == (
      cfg.router, cfg.router_score, cfg.num_selected_experts)
