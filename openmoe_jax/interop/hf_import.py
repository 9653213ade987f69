"""A Hugging Face OpenMoE folder (ours or the released one) or an OpenMoE t5x checkpoint as an
openmoe_jax MODEL_DIR (the library behind `openmoe-import`; docs/export.md).
"""
import json
import os
import shutil
import tempfile

import numpy as np

from openmoe_jax import fs, gin_utils
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.interop.hf import families, name_map
from openmoe_jax.training import run_dir
from openmoe_jax.errors import UsageError
from openmoe_jax.model.counts import abstract_params
from openmoe_jax.interop import t5x as t5x_checkpoint
from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.training import expert_bias, steps
from openmoe_jax.training.optimizer import make_optimizer


def _fail(msg):
  raise UsageError(msg)


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    _fail(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    _fail(f"{path}: invalid JSON ({e})")


def weight_files(hf_dir: str) -> dict:
  """{hf key: weight file}: safetensors (index or single file) or, as the released OpenMoE repos
  ship them, PyTorch pickles (pytorch_model.bin.index.json or pytorch_model.bin)."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(hf_dir, index_name)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        _fail(f"{index}: not a weight index ({type(e).__name__}: {e}); download it again")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    handle = _open_safetensors(single)
    try:
      return {k: single for k in handle.keys()}
    finally:
      handle.__exit__(None, None, None)
  single = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.isfile(single):
    return {k: single for k in _load_bin(single)}
  _fail(f"no model.safetensors, pytorch_model.bin or their index files in {hf_dir}")


def _damaged(path: str, e: BaseException) -> None:
  """One line for a weight file that cannot be read (cut short, a header that does not parse,
  not there): names the file and the fix, not the reader's traceback."""
  detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
  if isinstance(e, FileNotFoundError):
    _fail(f"{path}: the weight file is missing (the index names it); download it again")
  _fail(f"{path}: not a readable weight file ({detail}): the file is damaged or cut short; "
        "download it again")


def _missing(path: str, key: str) -> None:
  _fail(f"{path}: has no tensor {key}, which the index says it holds: the file or its index is "
        "damaged or from another download; download both again")


def _load_bin(path: str) -> dict:
  import torch
  # weights_only: a checkpoint is data, never code; mmap keeps one shard's pages on demand.
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # a truncated zip, a foreign pickle, a missing shard
    _damaged(path, e)


def _open_safetensors(path: str):
  """An open safe_open handle. safetensors checks at open that the header parses and that the
  file is as long as the header says, so a truncated file fails here, as one line."""
  from safetensors import safe_open
  try:
    return safe_open(path, framework="pt").__enter__()
  except Exception as e:  # SafetensorError (header, length), FileNotFoundError, ...
    _damaged(path, e)


class _Tensors:
  """Reads tensors by key from safetensors or .bin shards, one open shard of each kind at a time,
  as numpy arrays of a floating-point dtype (a tensor that cannot be read is one line naming
  its file)."""

  def __init__(self):
    self._handles, self._keys, self._bin_path, self._bin = {}, {}, None, None

  def get(self, path: str, key: str) -> np.ndarray:
    if path.endswith(".bin"):
      if path != self._bin_path:
        self._bin_path, self._bin = path, _load_bin(path)
      if not isinstance(self._bin, dict) or key not in self._bin:
        _missing(path, key)
      tensor = self._bin[key]
    else:
      if path not in self._handles:
        self._handles[path] = _open_safetensors(path)
        self._keys[path] = set(self._handles[path].keys())
      if key not in self._keys[path]:
        _missing(path, key)
      try:
        tensor = self._handles[path].get_tensor(key)
      except Exception as e:
        _damaged(path, e)
    return _to_numpy(tensor, path, key)

  def close(self):
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._bin = None


def _to_numpy(tensor, path: str, key: str) -> np.ndarray:
  """The tensor as numpy; only the float dtypes a checkpoint holds are readable (an integer or
  float8 tensor where a weight belongs is another file, or a damaged header)."""
  import ml_dtypes
  import torch
  if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (
      torch.float32, torch.bfloat16, torch.float16, torch.float64):
    kind = getattr(tensor, "dtype", type(tensor).__name__)
    _fail(f"{path}: tensor {key} has dtype {kind}, not float32/bfloat16/float16/float64: "
          "not an OpenMoE weight (mismatched or damaged file?)")
  tensor = tensor.contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


_FINITE_CHUNK = 1 << 22  # elements per isfinite pass: a few MiB of scratch, whatever the tensor


def count_nonfinite(array: np.ndarray) -> int:
  """How many NaN/Inf values `array` holds (any float dtype, bfloat16 included: ml_dtypes gives
  it np.isfinite). Checked in chunks, so the scratch memory stays small for a huge tensor."""
  array = np.asarray(array)
  if array.dtype.kind in "iub":  # integers and bools are always finite
    return 0
  flat = array.reshape(-1)
  bad = 0
  for i in range(0, flat.size, _FINITE_CHUNK):
    chunk = flat[i:i + _FINITE_CHUNK]
    bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
  return bad


def _check_finite(array: np.ndarray, where: str, fix: str) -> None:
  bad = count_nonfinite(array)
  if bad:
    _fail(f"{where} holds {bad} non-finite values (NaN/Inf): {fix}")


def load_params(hf_dir: str, cfg: ModelConfig, family: str = "openmoe") -> dict:
  """Our params tree (numpy, cfg.param_dtype) from the folder's weight files in `family`'s
  layout (`families.tensors`: 'openmoe', 'mixtral', 'olmoe', 'qwen3_moe').

  Tensors are read one at a time, straight into the output tree (a family's per-expert
  matrices into their slice of the [E, ...] array), so host memory holds the params being
  written plus one tensor.

  Every tensor is checked as it is read (so memory does not grow beyond the params themselves):
  a readable float dtype, the shape the model config needs, and finite values, both as stored
  and as cast to param_dtype. Data damaged inside a file (its header intact) reads fine but
  holds NaN/Inf; written out, it would fail a fine-tune later with a misleading "loss is nan".
  Any failure is one line naming the tensor and its file, before anything is written.
  """
  from flax import traverse_util
  want = traverse_util.flatten_dict(abstract_params(cfg))
  files = weight_files(hf_dir)
  hf = read_hf_config(hf_dir) if family in families.DEEPSEEK else {}
  entries = list(families.deepseek_tensors(family, cfg, families.rope_interleaved(hf))
                 if hf else families.tensors(family, cfg))
  skipped = families.skipped_layers(hf)
  files = {k: v for k, v in files.items() if not (skipped and k.startswith(skipped))}
  name = "OpenMoE" if family == "openmoe" else family
  missing = [e.hf_key for e in entries if e.hf_key not in files]
  if missing:
    _fail(f"{hf_dir} lacks {len(missing)} {name} tensors, e.g. {missing[0]}")
  extra = sorted(set(files) - {e.hf_key for e in entries})
  if extra:
    _fail(f"{hf_dir} has tensors this model does not, e.g. {extra[0]} (mismatched model?)")
  flat, tensors = {}, _Tensors()
  try:
    for e in entries:
      path = files[e.hf_key]
      stored = tensors.get(path, e.hf_key)
      if e.rows is not None and stored.shape[0] == len(e.rows):  # else the check below says
        stored = stored[np.asarray(e.rows)]
      array = stored.T if e.transpose else stored
      spec = want.get(e.flax_path)
      shape = None if spec is None else tuple(spec.shape[1:] if e.expert is not None
                                              else spec.shape)
      if shape is None or tuple(array.shape) != shape:
        need = None if spec is None else families.hf_shape(spec.shape, e)
        _fail(f"{path}: tensor {e.hf_key} has shape {tuple(stored.shape)}, the model needs "
              f"{need} (mismatched model?)")
      where = f"{path}: tensor {e.hf_key}"
      _check_finite(array, where, "the file is damaged; download it again")
      out = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
      if out.dtype != array.dtype:
        _check_finite(out, f"{where} as {out.dtype}",
                      "its values overflow that dtype; import with --param_dtype=float32")
      if e.expert is None:
        flat[e.flax_path] = out
      else:
        if e.flax_path not in flat:
          flat[e.flax_path] = np.empty(spec.shape, spec.dtype)
        flat[e.flax_path][e.expert] = out
  finally:
    tensors.close()
  return traverse_util.unflatten_dict(flat)


def model_config(hf: dict, gin_files, gin_bindings, param_dtype: str) -> ModelConfig:
  try:
    family = families.family_of(hf)
    fields = (name_map.model_config_fields(hf) if family == "openmoe"
              else families.model_config_fields(hf))
    ModelConfig(**fields)
  except ValueError as e:
    _fail(f"config.json: {e}")
  from_hf = ModelConfig(**fields, param_dtype=param_dtype)
  if not gin_files:
    return from_hf
  gin_utils.parse_gin(gin_files, gin_bindings, finalize=False)  # a run gin: its model
  cfg = gin_utils.model_config().replace(param_dtype=param_dtype)
  diff = name_map.shape_mismatch(cfg, from_hf)
  if diff:
    _fail("the model gin does not match config.json (" + ", ".join(diff) + ")")
  return cfg


def _check_empty(model_dir: str) -> None:
  if not fs.exists(model_dir):
    return
  names = fs.listdir(model_dir) if fs.isdir(model_dir) else None
  if names is None or names:
    unfinished = names and run_dir.MODEL_CONFIG not in names and run_dir.IMPORTED_FROM in names
    hint = (" (an unfinished import: it has no model_config.json; delete it and import again)"
            if unfinished else "")
    _fail(f"model_dir {model_dir} exists and is not empty{hint}")


def import_checkpoint(hf_dir: str, model_dir: str, *, gin_files=(), gin_bindings=(),
                      step: int = 0, param_dtype: str = "float32") -> dict:
  """Writes MODEL_DIR from HF_DIR; returns a summary. Raises UsageError."""
  _check_empty(model_dir)
  if not os.path.isdir(hf_dir):
    _fail(f"hf_dir not found: {hf_dir}")
  hf = read_hf_config(hf_dir)
  cfg = model_config(hf, gin_files, gin_bindings, param_dtype)
  family = families.family_of(hf)
  params = load_params(hf_dir, cfg, family)
  out = _commit(model_dir, cfg, params, step, {"hf_dir": os.path.abspath(hf_dir),
                                                "family": family},
                extra_files=_tokenizer_files(hf_dir) if family != "openmoe" else None,
                vocabulary=_umt5_record() if family == "openmoe" else None)
  out["family"] = family
  skipped = families.skipped_layers(hf)
  if skipped:
    out["skipped_tensors"] = sum(k.startswith(skipped) for k in weight_files(hf_dir))
  return out


def _tokenizer_files(hf_dir: str) -> dict:
  """The folder's tokenizer files, kept in MODEL_DIR/hf_tokenizer for `openmoe-export`."""
  return {f"{families.HF_TOKENIZER_DIR}/{n}": os.path.join(hf_dir, n)
          for n in families.TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))}


def import_t5x(checkpoint_path: str, model_dir: str, *, gin_files=(), gin_bindings=(),
               step=None, param_dtype: str = "float32", optimizer_state: bool = False) -> dict:
  """Writes MODEL_DIR from an OpenMoE t5x checkpoint; returns a summary. Raises UsageError."""
  from flax import traverse_util
  _check_empty(model_dir)
  if not gin_files:
    _fail("--t5x_checkpoint needs the model's --gin_file (e.g. models/openmoe_8b.gin)")
  gin_utils.parse_gin(gin_files, gin_bindings, finalize=False)  # a run gin: its model
  cfg = gin_utils.model_config().replace(param_dtype=param_dtype)
  want = traverse_util.flatten_dict(abstract_params(cfg))
  flat, saved_step = t5x_checkpoint.load_params(checkpoint_path, want)
  # t5x arrays carry no checksum either: damaged zarr chunks can decode to NaN/Inf.
  for p, array in flat.items():
    _check_finite(array, f"t5x checkpoint {checkpoint_path}: parameter {'/'.join(p)}",
                  "the checkpoint is damaged; copy it again")
  step = saved_step if step is None else step
  params = traverse_util.unflatten_dict(flat)
  opt_state = _fresh_opt_state(params, cfg)
  if optimizer_state:  # t5x Adafactor slots into our AdafactorState (same fields)
    import jax
    slots = t5x_checkpoint.load_adafactor_state(checkpoint_path, opt_state)
    for field, slot in slots.items():
      for p, array in (slot.items() if isinstance(slot, dict) else ()):
        _check_finite(array, f"t5x checkpoint {checkpoint_path}: optimizer state "
                      f"param_states/{'/'.join(p + (field,))}",
                      "the checkpoint is damaged; copy it again (or import without "
                      "--t5x_optimizer_state for a fresh one)")
    opt_state = opt_state._replace(count=jax.numpy.asarray(slots.pop("count")), **{
        k: traverse_util.unflatten_dict(v) for k, v in slots.items()})
  return _commit(model_dir, cfg, params, step,
                 {"t5x_checkpoint": os.path.abspath(checkpoint_path)}, opt_state,
                 vocabulary=_umt5_record())


def _umt5_record() -> dict:
  """vocabulary.json of an OpenMoE checkpoint: umT5's SentencePiece, found when used."""
  from openmoe_jax.data import vocab  # late: seqio, only once the weights have been read
  return dict(vocab.UMT5_RECORD)


def _commit(model_dir: str, cfg: ModelConfig, params, step: int, source: dict,
            opt_state=None, extra_files=None, vocabulary=None) -> dict:
  """MODEL_DIR with the checkpoint {step, params, opt_state (default: fresh)},
  `extra_files` ({relative name: source file}) and vocabulary.json (`vocabulary`; None: the
  tokenizer among `extra_files`, when it loads; `run_dir.write_vocabulary`), all or nothing."""
  if opt_state is None:
    opt_state = _fresh_opt_state(params, cfg)
  state = {"step": np.int32(step), "params": params, "opt_state": opt_state}
  summary = {"model_dir": model_dir, "step": step, "num_layers": cfg.num_layers,
             "num_experts": cfg.num_experts}
  if vocabulary is None:
    from openmoe_jax.data import hf_vocab  # late: seqio and transformers, for the tokenizer
    vocabulary, why = hf_vocab.import_record(extra_files or {}, cfg.vocab_size)
    if why:
      summary["note"] = (f"no vocabulary recorded: {why}; openmoe-score and openmoe-infer "
                         "need --mixture_or_task_name")
  summary["vocabulary"] = vocabulary
  if fs.is_url(model_dir):
    # Object stores cannot rename a folder, so the files go straight to MODEL_DIR: the
    # checkpoint is committed first, model_config.json last, so the tools never read an
    # unfinished import as a model dir. A failure removes what this import wrote (MODEL_DIR
    # was checked empty or absent), so a bucket is left as it was.
    try:
      _write_model_dir(model_dir, cfg, state, step, source, extra_files, vocabulary)
    except BaseException:
      if fs.exists(model_dir):
        fs.gfile().rmtree(model_dir)
      raise
    return summary
  parent = os.path.dirname(os.path.abspath(model_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(model_dir)) + ".tmp-", dir=parent)
  try:
    _write_model_dir(tmp, cfg, state, step, source, extra_files, vocabulary)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the model dir gets the user's umask
    if os.path.isdir(model_dir):
      os.rmdir(model_dir)  # checked empty above
    os.replace(tmp, model_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return summary


def _write_model_dir(dest: str, cfg: ModelConfig, state, step: int, source: dict,
                     extra_files=None, vocabulary=None) -> None:
  """The checkpoint, the extra files, imported_from.json, vocabulary.json (a record, or None),
  then model_config.json into `dest` (path or URL)."""
  with ckpt_lib.Checkpointer(dest, async_save=False) as ckpt:
    ckpt.save(step, state, {}, force=True)
  for name, src in (extra_files or {}).items():
    fs.makedirs(fs.join(dest, os.path.dirname(name)))
    fs.copy(src, fs.join(dest, name))
  fs.write_text(fs.join(dest, run_dir.IMPORTED_FROM), json.dumps(source))
  if vocabulary is not None:
    run_dir.write_vocabulary(dest, vocabulary)
  run_dir.write_model_config(dest, cfg)  # last: from now on the tools read `dest`


def _fresh_opt_state(params, cfg: ModelConfig):
  """A fresh OpenMoE Adafactor state for `params` (the train loop's default optimizer)."""
  import jax
  import jax.numpy as jnp
  tx, _ = make_optimizer("adafactor", param_axes=steps.param_axes(cfg))
  return tx.init(expert_bias.trainable(jax.tree.map(jnp.asarray, params)))
