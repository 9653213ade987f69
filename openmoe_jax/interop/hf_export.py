"""An openmoe_jax checkpoint as a Hugging Face folder in the released OpenMoE layout, or as an
OpenMoE t5x checkpoint (the library behind `openmoe-export`; docs/export.md).
"""
import json
import os
import shutil
import struct
import tempfile

import numpy as np

from openmoe_jax import fs
from openmoe_jax.data import corpus
from openmoe_jax.data import special_tokens
from openmoe_jax.training import run_dir
from openmoe_jax.errors import error_line
from openmoe_jax.interop.hf import families, name_map
from openmoe_jax.errors import UsageError
from openmoe_jax.training import console
from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.interop import t5x as t5x_checkpoint
from openmoe_jax.model.counts import abstract_params

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
_HERE = os.path.dirname(os.path.abspath(__file__))


def _chunks(array: np.ndarray, transpose: bool, dtype: str, chunk_bytes: int = 64 * 2**20):
  """The HF tensor's bytes in row blocks: transposing / casting block by block keeps the extra
  memory at chunk_bytes instead of a second full copy of the tensor."""
  import ml_dtypes
  target = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
  view = array.T if transpose else array
  row = max(int(np.prod(view.shape[1:])) * target.itemsize, 1)
  step = max(1, chunk_bytes // row)
  for start in range(0, view.shape[0], step):
    block = np.ascontiguousarray(view[start:start + step].astype(target, copy=False))
    yield block.reshape(-1).view(np.uint8)


def plan_shards(items, max_bytes: int):
  """Greedy split of [(key, shape, nbytes)] in order; a tensor above the limit gets its own."""
  shards, current, size = [], [], 0
  for item in items:
    if current and size + item[2] > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += item[2]
  if current:
    shards.append(current)
  return shards


def _write_shard(path, items, dtype, produce):
  """Writes one safetensors file; the header comes first, then tensors one at a time."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, shape, nbytes in items:
    header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, shape, nbytes in items:
      written = 0
      for block in produce(key):
        f.write(block)
        written += block.nbytes
      if written != nbytes:
        raise AssertionError(f"{key}: wrote {written} bytes, header says {nbytes}")


def _spm_path(model_dir: str, explicit) -> str:
  if explicit:
    if not fs.isfile(explicit):
      raise UsageError(f"SentencePiece model not found: {explicit}")
    return explicit
  task = run_dir.run_info(model_dir).get("mixture_or_task_name", "")
  if task.startswith("builtin"):
    return str(corpus.SPM_PATH)
  env = os.environ.get("OPENMOE_SPM_PATH")
  if env and fs.isfile(env):
    return env
  raise UsageError(f"cannot tell the SentencePiece model of {model_dir!r} (task "
                             f"{task or 'unknown'}): pass --spm_path or set $OPENMOE_SPM_PATH")


def _write_tokenizer(out_dir: str, spm: str) -> None:
  fs.copy(spm, os.path.join(out_dir, "tokenizer.model"))
  shutil.copyfile(os.path.join(_HERE, "hf", "tokenization_openmoe.py"),
                  os.path.join(out_dir, "tokenization_openmoe.py"))
  # Our SentencePiece tokenizer class (encodes exactly as seqio; BOS = pad id 0 prepended, no
  # EOS), through auto_map like the released repos' OpenMoeTokenizer.
  config = {"tokenizer_class": "OpenMoeTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_openmoe.OpenMoeTokenizer", None]},
            "extra_ids": 300, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "bos_token": "<pad>", "model_max_length": 2048, "padding_side": "left"}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)


# Written into every exported folder: --overwrite only ever replaces a folder that has it.
EXPORT_MARKER = ".openmoe_export.json"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _publish(tmp: str, output_dir: str, marker: dict) -> None:
  """Gives the finished folder `tmp` the user's umask (mkdtemp makes 0700) and the export
  marker, then puts it in place of `output_dir` (an earlier export, checked by
  `check_output_dir`)."""
  os.chmod(tmp, 0o777 & ~_umask())
  with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
    json.dump(marker, f)
  if not os.path.exists(output_dir):
    os.replace(tmp, output_dir)
    return
  # The earlier export is renamed aside before the new one is renamed in, and removed only
  # then: a kill between the two renames leaves it under the aside name, not lost.
  aside = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(output_dir)) + ".old-",
                           dir=os.path.dirname(os.path.abspath(output_dir)))
  os.rmdir(aside)
  os.replace(output_dir, aside)
  os.replace(tmp, output_dir)
  shutil.rmtree(aside) if os.path.isdir(aside) else os.remove(aside)


def _say_leftovers(output_dir: str) -> None:
  """One line per folder an interrupted export left next to OUTPUT_DIR (its unfinished
  `O.tmp-*`, or an earlier export renamed aside to `O.old-*`): kept, for the user to delete."""
  parent = os.path.dirname(os.path.abspath(output_dir))
  base = os.path.basename(os.path.abspath(output_dir))
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    if name.startswith((base + ".tmp-", base + ".old-")):
      what = ("an unfinished export" if ".tmp-" in name[len(base):]
              else "an earlier export renamed aside by an interrupted --overwrite")
      console.Say(None, prog=console.prog())(
          f"{os.path.join(parent, name)} is {what}: not used; delete it when you no longer "
          "need it")


def check_output_dir(model_dir: str, output_dir: str, overwrite: bool) -> None:
  """Refuses an output folder that would put the run (or anything but an earlier export) at risk.

  The output may not be the model dir, contain it or be inside it; an existing non-empty output
  is replaced only with `overwrite`, and only when an earlier `openmoe-export` wrote it.
  """
  out = os.path.realpath(output_dir)
  if not fs.is_url(model_dir):
    run = os.path.realpath(model_dir)
    if out == run or run.startswith(out + os.sep) or out.startswith(run + os.sep):
      where = ("is" if out == run else "contains" if run.startswith(out + os.sep)
               else "is inside")
      raise UsageError(f"--output_dir {output_dir} {where} the model dir "
                                 f"{model_dir}; choose a folder outside it")
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
    if not overwrite:
      raise UsageError(f"output {output_dir} exists and is not empty (use --overwrite)")
    if not os.path.isfile(os.path.join(output_dir, EXPORT_MARKER)):
      raise UsageError(f"--overwrite replaces only a folder openmoe-export wrote; "
                                 f"{output_dir} is not one (no {EXPORT_MARKER}): choose "
                                 "another --output_dir or remove it yourself")


def _open_reader(model_dir: str, step):
  """(ParamReader, step) of checkpoint `step`, or of the newest whose metadata reads."""
  return run_dir.read_checkpoint(model_dir, step, lambda s: ckpt_lib.ParamReader(model_dir, s))


def export_t5x(model_dir: str, output_dir: str, *, step=None, dtype: str = "float32",
               overwrite: bool = False) -> dict:
  """MODEL_DIR's checkpoint as OUTPUT_DIR/checkpoint_<step> in t5x's layout, array by array."""
  from flax import traverse_util
  if dtype not in _ST_DTYPES:
    raise UsageError(f"--dtype={dtype}: use float32 or bfloat16")
  check_output_dir(model_dir, output_dir, overwrite)
  _say_leftovers(output_dir)
  cfg = run_dir.load_model_config(model_dir)
  paths = list(traverse_util.flatten_dict(abstract_params(cfg)))
  reader, step = _open_reader(model_dir, step)
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(output_dir)) + ".tmp-",
                         dir=parent)
  try:
    for path in paths:
      try:
        reader.spec(path)
      except KeyError as err:
        raise UsageError(error_line(err).strip('"')) from None
    name = t5x_checkpoint.checkpoint_name(step)
    count = t5x_checkpoint.write_checkpoint(
        os.path.join(tmp, name), step, ((p, reader.read(p)) for p in paths), dtype)
    _publish(tmp, output_dir, {"model_dir": os.path.abspath(model_dir), "step": step,
                               "format": "t5x"})
  finally:
    reader.close()
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return {"step": step, "tensors": count, "format": "t5x",
          "checkpoint": os.path.join(output_dir, name)}


HF_FAMILIES = ("openmoe", *families.FAMILIES)


def resolve_family(cfg, family=None) -> str:
  """The Hugging Face layout to write: `family`, or the one `cfg` is built like
  (`families.infer_family`; OpenMoE's own otherwise). Raises UsageError when the layout cannot
  hold the model, naming what it lacks."""
  if family is not None and family not in HF_FAMILIES:
    raise UsageError(f"--hf_family={family}: choose from {', '.join(HF_FAMILIES)}")
  family = family or families.infer_family(cfg) or "openmoe"
  if family == "openmoe":
    missing = name_map.unexportable(cfg)
    name = "OpenMoE"
  else:
    missing = families.unexportable(cfg, family)
    name = family
  if missing:
    raise UsageError(f"the {name} Hugging Face layout has no {' and no '.join(missing)}: this "
                     "model cannot be exported to it (--format=t5x writes every parameter)")
  return family


def _copy_hf_tokenizer(model_dir: str, out_dir: str) -> list:
  """The tokenizer files an import kept (MODEL_DIR/hf_tokenizer) into the export."""
  src = fs.join(model_dir, families.HF_TOKENIZER_DIR)
  names = sorted(fs.listdir(src)) if fs.isdir(src) else []
  for name in names:
    fs.copy(fs.join(src, name), os.path.join(out_dir, name))
  return names


def export(model_dir: str, output_dir: str, *, step=None, dtype: str = "float32",
           max_shard_size_mb: float = 5000, spm_path=None, overwrite: bool = False,
           hf_family=None) -> dict:
  """Exports MODEL_DIR's checkpoint to OUTPUT_DIR; returns a summary dict.

  hf_family: 'openmoe' (OpenMoE's released layout, remote code), 'mixtral', 'olmoe',
    'qwen3_moe', 'deepseek_v2' or 'deepseek_v3' (the family's own layout, which transformers loads without remote code);
    default: the one the model is built like.

  Raises:
    UsageError: bad input (no checkpoint, output in the way, unknown dtype, a layout that
      cannot hold the model, ...).
  """
  if dtype not in _ST_DTYPES:
    raise UsageError(f"--dtype={dtype}: use float32 or bfloat16")
  check_output_dir(model_dir, output_dir, overwrite)
  _say_leftovers(output_dir)
  cfg = run_dir.load_model_config(model_dir)
  family = resolve_family(cfg, hf_family)
  spm = _spm_path(model_dir, spm_path) if family == "openmoe" else None
  reader, step = _open_reader(model_dir, step)
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(output_dir)) + ".tmp-",
                         dir=parent)
  try:
    width = 2 if dtype == "bfloat16" else 4
    table = {}
    items = []
    for e in families.tensors(family, cfg):
      try:
        shape, _ = reader.spec(e.flax_path)
      except KeyError as err:
        raise UsageError(error_line(err).strip('"')) from None
      hf_shape = families.hf_shape(shape, e)
      table[e.hf_key] = e
      items.append((e.hf_key, hf_shape, int(np.prod(hf_shape)) * width))
    last = {}  # the array read last: a family's E expert tensors are slices of one array

    def produce(key):
      e = table[key]
      if last.get("path") != e.flax_path:
        last.clear()
        last.update(path=e.flax_path, array=reader.read(e.flax_path))
      array = last["array"] if e.expert is None else last["array"][e.expert]
      if e.rows is not None:  # back to the stored row order (families.Tensor.rows)
        back = np.argsort(np.asarray(e.rows))
        array = array[:, back] if e.transpose else array[back]
      return _chunks(array, e.transpose, dtype)
    shards = plan_shards(items, int(max_shard_size_mb * 2**20))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
      _write_shard(os.path.join(tmp, name), shard, dtype, produce)
    total = sum(n for _, _, n in items)
    if len(shards) > 1:
      index = {"metadata": {"total_size": total},
               "weight_map": {k: name for name, s in zip(names, shards) for k, _, _ in s}}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    if family == "openmoe":
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(name_map.hf_config(cfg, dtype), f, indent=1)
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(dict(name_map.token_ids(), decoder_start_token_id=special_tokens.BOS_ID,
                       transformers_version="4.34.0"), f, indent=1)
      _write_tokenizer(tmp, spm)
      shutil.copyfile(os.path.join(_HERE, "hf", "modeling_openmoe.py"),
                      os.path.join(tmp, "modeling_openmoe.py"))
    else:
      _copy_hf_tokenizer(model_dir, tmp)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(families.hf_config(cfg, family, dtype), f, indent=1)
    _publish(tmp, output_dir, {"model_dir": os.path.abspath(model_dir), "step": step,
                               "family": family})
  finally:
    reader.close()
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return {"step": step, "tensors": len(items), "bytes": total, "shards": len(shards),
          "family": family, "output_dir": output_dir}
