"""Shared by the commands that read a trained MODEL_DIR (openmoe-eval, openmoe-score).

MODEL_DIR may be a local path or a URL such as gs://bucket/run (`openmoe_jax.fs`).
"""
import dataclasses
import json
from typing import Optional, Sequence

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import fs
from openmoe_jax.config import ModelConfig
from openmoe_jax.gin_utils import UsageError, error_line


def load_model_config(model_dir: str, overrides: Sequence[str] = ()) -> ModelConfig:
  """The ModelConfig a run recorded in MODEL_DIR/model_config.json, with FIELD=VALUE overrides."""
  path = fs.join(model_dir, "model_config.json")
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
  path = fs.join(model_dir, "run.json")
  if not fs.exists(path):
    return {}
  return json.loads(fs.read_text(path))
