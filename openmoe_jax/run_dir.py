"""The run directory (MODEL_DIR): the one module that writes and reads its files.

Checkpoints live under MODEL_DIR/checkpoints (`checkpoint.py`); this module owns the rest:
run.json and model_config.json (written at each start, read by the tools), config.gin, and the
compatibility check of a restart. MODEL_DIR may be a local path or a URL such as gs://bucket/run
(`openmoe_jax.fs`); every file is written through a temporary name.
"""
import dataclasses
import json
from typing import Optional, Sequence

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import fs
from openmoe_jax.config import ModelConfig
from openmoe_jax.errors import UsageError, error_line

MODEL_CONFIG, RUN_INFO, CONFIG_GIN = "model_config.json", "run.json", "config.gin"
SHAPE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "expert_mlp_dim",
                "num_layers", "num_experts", "num_sparse_layers")


def check_model_dir(model_dir: str, cfg: ModelConfig) -> None:
  """Refuses a MODEL_DIR that holds checkpoints of a different model (reads only)."""
  path = fs.join(model_dir, MODEL_CONFIG)
  ours = dataclasses.asdict(cfg)
  if fs.exists(path) and ckpt_lib.list_steps(model_dir):
    theirs = json.loads(fs.read_text(path))
    diff = [k for k in SHAPE_FIELDS if theirs.get(k) != ours[k]]
    if diff:
      raise UsageError(f"MODEL_DIR {model_dir} holds a different model ("
                       + ", ".join(f"{k}: {theirs.get(k)} != {ours[k]}" for k in diff) + ")")


def write_run_files(model_dir: str, mixture_or_task_name: str, task_feature_lengths,
                    operative_config: Optional[str] = None,
                    model_config: Optional[ModelConfig] = None) -> None:
  """MODEL_DIR/run.json (read by openmoe-score / -eval) and, when given, config.gin and
  model_config.json (read by the tools and by the next start's `check_model_dir`).

  Each is written to a temporary name and renamed; MODEL_DIR may be a URL.
  """
  fs.makedirs(model_dir)
  if model_config is not None:
    fs.write_text(fs.join(model_dir, MODEL_CONFIG),
                  json.dumps(dataclasses.asdict(model_config), indent=1))
  if operative_config is not None:
    fs.write_text(fs.join(model_dir, CONFIG_GIN), operative_config)
  fs.write_text(fs.join(model_dir, RUN_INFO), json.dumps(
      {"mixture_or_task_name": mixture_or_task_name,
       "task_feature_lengths": dict(task_feature_lengths)}))


def load_model_config(model_dir: str, overrides: Sequence[str] = ()) -> ModelConfig:
  """The ModelConfig a run recorded in MODEL_DIR/model_config.json, with FIELD=VALUE overrides."""
  path = fs.join(model_dir, MODEL_CONFIG)
  if not fs.exists(path):
    raise UsageError(f"{model_dir} is not an openmoe_jax model dir (no model_config.json)")
  fields = json.loads(fs.read_text(path))
  known = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  for item in overrides:
    name, sep, value = item.partition("=")
    if not sep or name not in known:
      raise UsageError(f"bad override {item!r}; use FIELD=VALUE with a ModelConfig field")
    fields[name] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UsageError(error_line(e)) from None


def load_params(model_dir: str, step: Optional[int]):
  """Params of checkpoint `step` (latest when None) as numpy arrays."""
  steps = ckpt_lib.list_steps(model_dir)
  if not steps:
    raise UsageError(f"no complete checkpoint in {model_dir}")
  if step is not None and step not in steps:
    raise UsageError(f"no checkpoint for step {step} in {model_dir} (have {steps})")
  step = steps[-1] if step is None else step
  return ckpt_lib.restore_params(model_dir, step), step


def run_info(model_dir: str) -> dict:
  """What MODEL_DIR/run.json records (task, feature lengths), or {} without one."""
  path = fs.join(model_dir, RUN_INFO)
  if not fs.exists(path):
    return {}
  return json.loads(fs.read_text(path))
