"""The run directory (MODEL_DIR): the one module that writes and reads its files.

Checkpoints live under MODEL_DIR/checkpoints (`checkpoint.py`); this module owns the rest:
run.json and model_config.json (written at each start, read by the tools), config.gin,
vocabulary.json (an imported model's vocabulary), and the compatibility check of a restart. MODEL_DIR may be a local path or a URL such as gs://bucket/run
(`openmoe_jax.fs`); every file is written through a temporary name.
"""
import dataclasses
import json
import time
from typing import Any, Mapping, Optional, Sequence, Union

from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax import fs
from openmoe_jax.model import config as config_lib
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.errors import UsageError, error_line
from openmoe_jax.training import console
from openmoe_jax.training import resume

MODEL_CONFIG, RUN_INFO, CONFIG_GIN = "model_config.json", "run.json", "config.gin"
EVAL_RESULTS = "eval_results.jsonl"   # one JSON line per openmoe-eval run
IMPORTED_FROM = "imported_from.json"  # what openmoe-import read (a model dir it made)
VOCABULARY = "vocabulary.json"  # the vocabulary of an imported model (`write_vocabulary`)
SHAPE_FIELDS = config_lib.SHAPE_FIELDS  # re-exported


def check_model_dir(model_dir: str, cfg: ModelConfig) -> None:
  """Refuses a MODEL_DIR that holds checkpoints of a different model (reads only)."""
  path = fs.join(model_dir, MODEL_CONFIG)
  ours = dataclasses.asdict(cfg)
  if fs.exists(path) and ckpt_lib.list_steps(model_dir):
    # A field a run from an older version did not save has its default value.
    defaults = dataclasses.asdict(ModelConfig())
    theirs = {**{k: defaults[k] for k in SHAPE_FIELDS}, **json.loads(fs.read_text(path))}
    diff = [k for k in SHAPE_FIELDS if theirs.get(k) != ours[k]]
    if diff:
      raise UsageError(f"MODEL_DIR {model_dir} holds a different model ("
                       + ", ".join(f"{k}: {theirs.get(k)} != {ours[k]}" for k in diff) + ")")


def write_run_files(model_dir: str, mixture_or_task_name: str, task_feature_lengths,
                    operative_config: Optional[str] = None,
                    model_config: Optional[ModelConfig] = None, *,
                    start_step: Optional[int] = None, command: str = "",
                    layout: Optional[dict] = None) -> None:
  """MODEL_DIR/run.json (read by the tools and by the next start's checks) and, when given,
  model_config.json and this start's operative config.

  The operative config goes to config.gin at the first start (step 0, or a fine-tuning run's
  first step) and to config-<step>.gin at every start, headed by the command line, so each
  start of a run is on record. Each file is written to a temporary name and renamed; MODEL_DIR
  may be a URL.

  Args:
    layout: what decides the batches and the routing groups, checked when the run resumes:
      {"num_expert_replicas", "num_data_shards", "process_count", "mesh"}, and the
      "batch_size" (the tools' default batch, `batch_size`).
  """
  fs.makedirs(model_dir)
  if model_config is not None:
    write_model_config(model_dir, model_config)
  if operative_config is not None:
    if start_step in (None, 0) or not fs.exists(fs.join(model_dir, CONFIG_GIN)):
      fs.write_text(fs.join(model_dir, CONFIG_GIN), operative_config)
    if start_step is not None:
      name, k = f"config-{start_step}.gin", 1
      while fs.exists(fs.join(model_dir, name)):
        name, k = f"config-{start_step}-{k}.gin", k + 1
      header = (f"# openmoe-train started at step {start_step} on "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n# command: {command}\n\n")
      fs.write_text(fs.join(model_dir, name), header + operative_config)
  fs.write_text(fs.join(model_dir, RUN_INFO), json.dumps(
      {"mixture_or_task_name": mixture_or_task_name,
       "task_feature_lengths": dict(task_feature_lengths), **(layout or {})}))


def write_model_config(model_dir: str, model_config: ModelConfig) -> None:
  """MODEL_DIR/model_config.json: what makes a folder a model dir the tools read."""
  fs.write_text(fs.join(model_dir, MODEL_CONFIG),
                json.dumps(dataclasses.asdict(model_config), indent=1))


def sequence_length(model_dir: str, explicit: Optional[int] = None) -> int:
  """The length budget of the tools: `explicit` (--max_length), else the sequence length the
  run trained at (run.json's task feature lengths, summed); UsageError when neither is known."""
  if explicit is not None:
    if explicit < 1:
      raise UsageError(f"--max_length must be >= 1, got {explicit}")
    return explicit
  lengths = run_info(model_dir).get("task_feature_lengths") or {}
  if not lengths:
    raise UsageError(f"{model_dir} records no training length: pass --max_length")
  return int(sum(lengths.values()))


def append_eval_result(model_dir: str, result: dict) -> None:
  """One line of MODEL_DIR/eval_results.jsonl."""
  fs.append_text(fs.join(model_dir, EVAL_RESULTS), json.dumps(result) + "\n")


def batch_size(model_dir: str, default: int = 8) -> int:
  """The global batch size the run trained with: run.json's `batch_size`, else (a run from
  before run.json recorded it) the `BATCH_SIZE` macro of its config.gin, else `default`."""
  recorded = run_info(model_dir).get("batch_size")
  if isinstance(recorded, int):
    return recorded
  path = fs.join(model_dir, CONFIG_GIN)
  if fs.exists(path):
    import re
    m = re.search(r"^BATCH_SIZE = (\d+)", fs.read_text(path), re.M)
    if m:
      return int(m.group(1))
  return default


def check_resume_layout(model_dir: str, *, num_expert_replicas: int, explicit_replicas: bool,
                        mesh_shape: dict, process_count: int) -> tuple:
  """Compares a resumed run's grouping with what its last start recorded in run.json.

  Returns:
    (num_data_shards recorded or None, one line saying what changed or None).

  Raises:
    UsageError: the routing groups would change (num_expert_replicas follows the data axis)
      and the user did not choose a value: the message gives both choices.
  """
  info = run_info(model_dir)
  saved = info.get("num_expert_replicas")
  if saved is not None and saved != num_expert_replicas and not explicit_replicas:
    raise UsageError(
        f"resuming on another mesh changes the routing groups: this run trained with "
        f"num_expert_replicas={saved} (its data axis), the new mesh gives {num_expert_replicas}; "
        f"keep the saved routing with --gin.train.num_expert_replicas={saved}, or accept the "
        f"change with --gin.train.num_expert_replicas={num_expert_replicas}")
  changed = []
  old_mesh = info.get("mesh")
  if old_mesh and old_mesh != mesh_shape:
    fmt = lambda m: " x ".join(f"{k} {v}" for k, v in m.items())
    changed.append(f"mesh {fmt(old_mesh)} -> {fmt(mesh_shape)}")
  if info.get("process_count") not in (None, process_count):
    changed.append(f"processes {info['process_count']} -> {process_count}")
  if saved is not None and saved != num_expert_replicas:
    changed.append(f"routing groups: num_expert_replicas {saved} -> {num_expert_replicas}")
  note = "resuming with " + ", ".join(changed) if changed else None
  return info.get("num_data_shards"), note


def load_model_config(model_dir: str,
                      overrides: Union[Mapping[str, Any], Sequence[str]] = ()) -> ModelConfig:
  """The ModelConfig a run recorded in MODEL_DIR/model_config.json, with overrides: a
  {field: value} mapping or FIELD=VALUE texts, both typed by `config.field_value`."""
  path = fs.join(model_dir, MODEL_CONFIG)
  if not fs.exists(path):
    raise UsageError(f"{model_dir} is not an openmoe_jax model dir (no model_config.json)")
  fields = json.loads(fs.read_text(path))
  try:
    if isinstance(overrides, Mapping):
      fields.update({k: config_lib.field_value(k, v) for k, v in overrides.items()})
    else:
      fields.update(config_lib.parse_overrides(overrides))
  except ValueError as e:
    raise UsageError(f"model override: {error_line(e)}") from None
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UsageError(error_line(e)) from None


def checkpoint_step(model_dir: str, step: Optional[int] = None) -> int:
  """`step` when MODEL_DIR has it complete, else (None) its newest complete checkpoint;
  UsageError (naming the steps there are) otherwise. The one step resolution of the tools."""
  steps = ckpt_lib.list_steps(model_dir)
  if not steps:
    raise UsageError(f"no complete checkpoint in {model_dir}")
  if step is not None and step not in steps:
    raise UsageError(f"no checkpoint for step {step} in {model_dir} (have {steps})")
  return steps[-1] if step is None else step


def read_checkpoint(model_dir: str, step: Optional[int], read, say=None):
  """(read(step), step) of checkpoint `step`, or with None of the newest checkpoint that reads
  (newer damaged ones are said and skipped: `resume.read_newest`). `say` prints a line
  (default: on stderr, prefixed with the command's name)."""
  if step is not None:
    step = checkpoint_step(model_dir, step)
    try:
      return read(step), step
    except Exception as e:  # pylint: disable=broad-except  (damage: one line, not a traceback)
      resume.quiet_failed_reads()
      raise UsageError(f"checkpoint {step} could not be read ({resume.short_error(e)}); "
                       "leave out --step to use the newest one that reads") from None
  return resume.read_newest(model_dir, read, say or console.Say(None, prog=console.prog()))


def load_params(model_dir: str, step: Optional[int] = None, say=None):
  """(params as numpy arrays, step) of checkpoint `step`, or of the newest that reads."""
  return read_checkpoint(model_dir, step, lambda s: ckpt_lib.restore_params(model_dir, s), say)



def _vocabulary_problem(record) -> Optional[str]:
  """What is wrong with a vocabulary.json record, or None (`write_vocabulary`'s schema)."""
  if not isinstance(record, dict):
    return "not a JSON object"
  kind = record.get("kind")
  if kind == "hf_tokenizer":
    if not isinstance(record.get("path"), str) or not record["path"]:
      return "kind 'hf_tokenizer' needs a \"path\" (the tokenizer folder)"
  elif kind == "sentencepiece":
    if ("model" in record) == ("path" in record):
      return "kind 'sentencepiece' needs one of \"model\": \"umt5\" and \"path\""
    if "model" in record and record["model"] != "umt5":
      return f"unknown sentencepiece model {record['model']!r} (only 'umt5')"
    if "path" in record and (not isinstance(record["path"], str) or not record["path"]):
      return "\"path\" must name the SentencePiece model file"
    extra = record.get("extra_ids", 0)
    if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
      return f"\"extra_ids\" must be a count >= 0, got {extra!r}"
  else:
    return f"unknown kind {kind!r} (hf_tokenizer or sentencepiece)"
  return None


def write_vocabulary(model_dir: str, record: dict) -> None:
  """MODEL_DIR/vocabulary.json (temporary name, then renamed): the vocabulary the tools encode
  and decode with when no task is given (`data.vocab.resolve_vocabulary`). One of
    {"kind": "hf_tokenizer", "path": "hf_tokenizer"}: a Hugging Face tokenizer folder;
    {"kind": "sentencepiece", "model": "umt5", "extra_ids": 300}: OpenMoE's umT5 model, found
      where the tasks find it (gin `openmoe_jax.vocab.umt5_spm_path.path`, else
      $OPENMOE_SPM_PATH) when a tool needs it;
    {"kind": "sentencepiece", "path": "spm.model", "extra_ids": N}: that SentencePiece file.
  A relative path is relative to MODEL_DIR; an absolute one or a URL is taken as it is."""
  problem = _vocabulary_problem(record)
  if problem:
    raise ValueError(f"bad vocabulary record {record!r}: {problem}")
  fs.write_text(fs.join(model_dir, VOCABULARY), json.dumps(record, indent=1))


def read_vocabulary(model_dir: str) -> Optional[dict]:
  """The record MODEL_DIR/vocabulary.json holds, or None without one; UsageError in one line
  when the file is damaged."""
  path = fs.join(model_dir, VOCABULARY)
  if not fs.exists(path):
    return None
  try:
    record = json.loads(fs.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    problem = f"not valid JSON ({error_line(e)})"
  else:
    problem = _vocabulary_problem(record)
  if problem:
    raise UsageError(f"{path}: {problem}; fix or delete it, or pass --mixture_or_task_name")
  return record


def run_info(model_dir: str) -> dict:
  """What MODEL_DIR/run.json records (task, feature lengths), or {} without one."""
  path = fs.join(model_dir, RUN_INFO)
  if not fs.exists(path):
    return {}
  return json.loads(fs.read_text(path))
