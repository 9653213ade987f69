"""The run settings `train()` takes, in one table, checked before anything is written.

Each row: the argument, the gin name users set (a macro of runs/pretrain.gin, or `train.X`), and
the rule. A failure is one UsageError line naming the setting, the value and what it must be, so
`--gin.KEEP_CHECKPOINTS=0` (which orbax would read as "keep none" and act on by deleting every
checkpoint) or `--gin.CHECKPOINT_PERIOD=0` stop before MODEL_DIR is touched. A new argument of
`train()` without a row fails `tests/test_settings.py`.
"""
from typing import Any, Mapping

from openmoe_jax.errors import UsageError

POSITIVE, NON_NEGATIVE, INTEGER, FLAG = "positive", "non_negative", "integer", "flag"

# argument -> (the name users set, rule)
SETTINGS = {
    "train_steps": ("TRAIN_STEPS", POSITIVE),
    "batch_size": ("BATCH_SIZE", POSITIVE),
    "checkpoint_period": ("CHECKPOINT_PERIOD", POSITIVE),
    "eval_period": ("EVAL_PERIOD", NON_NEGATIVE),  # 0: no evaluation during training
    "eval_steps": ("EVAL_STEPS", POSITIVE),
    "log_period": ("train.log_period", POSITIVE),
    "keep_checkpoints": ("KEEP_CHECKPOINTS", POSITIVE),
    "num_microbatches": ("NUM_MICROBATCHES", POSITIVE),
    "num_expert_partitions": ("NUM_EXPERT_PARTITIONS", POSITIVE),
    "num_model_partitions": ("NUM_MODEL_PARTITIONS", POSITIVE),
    "seed": ("SEED", INTEGER),
    "pack": ("train.pack", FLAG),
    "progress_bar": ("train.progress_bar", FLAG),
    "fail_on_nan": ("train.fail_on_nan", FLAG),
    "spike_rollbacks": ("train.spike_rollbacks", NON_NEGATIVE),  # 0: no spike detector
    "spike_skip_batches": ("train.spike_skip_batches", NON_NEGATIVE),
    "spike_min_steps": ("train.spike_min_steps", NON_NEGATIVE),
    "spike_window": ("train.spike_window", POSITIVE),
    "spike_rollback_steps": ("train.spike_rollback_steps", POSITIVE),
}
# Settings checked elsewhere, with their own messages: the model dir, data, optimizer, mesh.
CHECKED_ELSEWHERE = ("model_config", "model_dir", "mixture_or_task_name", "task_feature_lengths",
                     "eval_split", "optimizer", "optimizer_kwargs", "peak_flops_per_device",
                     "num_data_shards", "num_expert_replicas", "initial_checkpoint_dir",
                     "partitioning_rules",
                     "spike_threshold")  # a positive float: checked in train()

# `openmoe-eval`'s settings (`evaluate_checkpoint`, macros of runs/eval.gin), the same way:
# EVAL_STEPS=0 would report the loss of no batch as 0 (a perfect model that is not).
EVAL_SETTINGS = {
    "batch_size": ("BATCH_SIZE", POSITIVE),
    "eval_steps": ("EVAL_STEPS", POSITIVE),
    "num_shots": ("NUM_SHOTS", NON_NEGATIVE),
    "num_samples": ("NUM_SAMPLES", POSITIVE),
    "fewshot_seed": ("FEWSHOT_SEED", INTEGER),
    "sample_seed": ("SAMPLE_SEED", INTEGER),
    "no_drop": ("EVAL_NO_DROP", FLAG),
}

_MUST = {POSITIVE: "a positive integer", NON_NEGATIVE: "a non-negative integer",
         INTEGER: "an integer", FLAG: "True or False"}


def _ok(value: Any, rule: str) -> bool:
  if rule == FLAG:
    return isinstance(value, bool)
  if isinstance(value, bool) or not isinstance(value, int):
    return False
  return {POSITIVE: value >= 1, NON_NEGATIVE: value >= 0, INTEGER: True}[rule]


def check(values: Mapping[str, Any], table: Mapping[str, tuple] = SETTINGS) -> None:
  """Raises UsageError for the first setting in `values` that breaks its rule in `table`."""
  for arg, (name, rule) in table.items():
    if arg in values and not _ok(values[arg], rule):
      raise UsageError(f"{name}={values[arg]!r}: must be {_MUST[rule]}")
  lengths = values.get("task_feature_lengths")
  if lengths is not None:
    if not isinstance(lengths, Mapping) or not lengths or not all(
        isinstance(k, str) and _ok(v, POSITIVE) for k, v in lengths.items()):
      raise UsageError(f"TASK_FEATURE_LENGTHS={lengths!r}: must be a dict of feature names to "
                       "positive integers, e.g. {'targets': 128}")
