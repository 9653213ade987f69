"""openmoe-import checks what it reads before it writes: weight files damaged inside their data
(NaN/Inf where the header is intact), cut short or with a broken header, in safetensors (float32
shards, a bfloat16 single file) and t5x checkpoints, are one line naming the tensor and the file,
exit code 2, and no MODEL_DIR (nor MODEL_DIR.tmp-*) left behind."""
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from run_dirs import make_run_dir  # noqa: E402
from openmoe_jax.training import checkpoint as ckpt_lib  # noqa: E402
from openmoe_jax.commands import export as export_cmd  # noqa: E402
from openmoe_jax.commands import import_model as import_cmd  # noqa: E402
from openmoe_jax.interop import hf_import  # noqa: E402
from openmoe_jax.model.config import ModelConfig  # noqa: E402

TINY_GIN = ["--gin_file=models/tiny.gin", "--gin.NUM_EMBEDDINGS=8192"]
CFG = ModelConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                  group_size=64, activation_dtype="float32")
# The expert tensor the tests damage (layer 1 is the MoE layer of this config).
EXPERT = "model.layers.1.mlp.experts.wi_gate"
NAN = {"F32": struct.pack("<f", float("nan")), "BF16": b"\xc0\x7f"}  # little-endian quiet NaN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("verify") / "run", CFG, step=1, seed=2)


@pytest.fixture(scope="module")
def hf_dir(run_dir):
  """Sharded float32 safetensors with model.safetensors.index.json."""
  out = run_dir.parent / "hf"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}",
                          "--max_shard_size_mb=0.5"]) == 0
  return out


def _copy(src, dest):
  shutil.copytree(src, dest)
  return dest


def _shard_of(hf_dir, key):
  index = hf_dir / "model.safetensors.index.json"
  if index.exists():
    return hf_dir / json.loads(index.read_text())["weight_map"][key]
  return hf_dir / "model.safetensors"


def _poison(path, key, count):
  """Overwrites the first `count` values of tensor `key` in the safetensors file `path` with NaN,
  in place, leaving the header (and so every check safetensors itself makes) intact."""
  with open(path, "r+b") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(header_len))[key]
    start, end = entry["data_offsets"]
    nan = NAN[entry["dtype"]]
    assert count * len(nan) <= end - start
    f.seek(8 + header_len + start)
    f.write(nan * count)


def _import(hf_dir, dest, *extra):
  return import_cmd.main([f"--hf_dir={hf_dir}", f"--model_dir={dest}", *extra])


def _one_line_failure(capsys, code):
  """The import's exit code was 2 and its stderr ends in one `openmoe-import: error:` line,
  with no traceback before it."""
  err = capsys.readouterr().err
  assert code == 2, err[-3000:]
  lines = err.strip().splitlines()
  assert lines and lines[-1].startswith("openmoe-import: error: "), lines
  assert "Traceback" not in err and len(lines[-1]) < 600, err[-3000:]
  return lines[-1]


def _nothing_written(tmp_path, *keep):
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)  # no dest, no dest.tmp-*


def test_nan_inside_a_shard_is_named_and_nothing_is_written(hf_dir, tmp_path, capsys):
  bad = _copy(hf_dir, tmp_path / "bad")
  shard = _shard_of(bad, EXPERT)
  _poison(shard, EXPERT, 412)
  dest = tmp_path / "dest"
  line = _one_line_failure(capsys, _import(bad, dest, *TINY_GIN))
  assert f"{shard.name}: tensor {EXPERT} holds 412 non-finite values (NaN/Inf)" in line, line
  assert "download it again" in line
  _nothing_written(tmp_path, "bad")
  # an existing empty MODEL_DIR is left as it was
  dest.mkdir()
  _one_line_failure(capsys, _import(bad, dest, *TINY_GIN))
  assert dest.is_dir() and not os.listdir(dest)
  _nothing_written(tmp_path, "bad", "dest")


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_shard_is_one_line(hf_dir, tmp_path, capsys, cut):
  bad = _copy(hf_dir, tmp_path / "bad")
  shard = _shard_of(bad, EXPERT)
  blob = shard.read_bytes()
  (header_len,) = struct.unpack("<Q", blob[:8])
  # cut inside the data (shorter than the header says) or inside the JSON header itself
  shard.write_bytes(blob[:len(blob) - 100] if cut == "data" else blob[:8 + header_len // 2])
  line = _one_line_failure(capsys, _import(bad, tmp_path / "dest", *TINY_GIN))
  assert shard.name in line and "download it again" in line, line
  _nothing_written(tmp_path, "bad")


def test_a_shard_the_index_names_but_that_is_gone_is_one_line(hf_dir, tmp_path, capsys):
  bad = _copy(hf_dir, tmp_path / "bad")
  shard = _shard_of(bad, EXPERT)
  shard.unlink()
  line = _one_line_failure(capsys, _import(bad, tmp_path / "dest", *TINY_GIN))
  assert shard.name in line and "missing" in line, line
  _nothing_written(tmp_path, "bad")


def test_bfloat16_single_file_is_checked_too(run_dir, tmp_path, capsys):
  bf16 = tmp_path / "bf16"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={bf16}",
                          "--dtype=bfloat16"]) == 0
  assert (bf16 / "model.safetensors").is_file()
  # the good bfloat16 folder still imports (its values as stored, widened to float32)
  good = tmp_path / "good"
  assert _import(bf16, good, *TINY_GIN) == 0
  want = jax.tree.leaves(ckpt_lib.restore_params(str(run_dir)))
  got = jax.tree.leaves(ckpt_lib.restore_params(str(good)))
  assert len(want) == len(got) and all(np.isfinite(x).all() for x in got)
  for x, y in zip(want, got):
    np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-6)
  _poison(bf16 / "model.safetensors", EXPERT, 7)
  capsys.readouterr()
  line = _one_line_failure(capsys, _import(bf16, tmp_path / "dest", *TINY_GIN))
  assert f"model.safetensors: tensor {EXPERT} holds 7 non-finite values" in line, line
  _nothing_written(tmp_path, "bf16", "good")


def test_a_good_folder_still_imports_bitwise(run_dir, hf_dir, tmp_path):
  dest = tmp_path / "dest"
  assert _import(hf_dir, dest, *TINY_GIN) == 0
  for x, y in zip(jax.tree.leaves(ckpt_lib.restore_params(str(run_dir))),
                  jax.tree.leaves(ckpt_lib.restore_params(str(dest)))):
    assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y)


def test_count_nonfinite_any_dtype_in_chunks(monkeypatch):
  import ml_dtypes
  monkeypatch.setattr(hf_import, "_FINITE_CHUNK", 5)  # several chunks, a partial last one
  x = np.arange(23, dtype=np.float32)
  x[[0, 6, 22]] = [np.nan, np.inf, -np.inf]
  for dtype in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16):
    assert hf_import.count_nonfinite(x.astype(dtype).reshape(1, 23)) == 3, dtype
  assert hf_import.count_nonfinite(np.arange(4, dtype=np.int32)) == 0


def test_t5x_checkpoint_with_nan_is_named(tmp_path, capsys):
  from flax import traverse_util
  from test_t5x_checkpoint import _params, write_t5x
  flat = _params()
  name = ("decoder", "layers_1", "mlp", "expert", "wi_0", "kernel")
  assert name in flat, sorted(flat)
  flat[name] = np.array(flat[name])
  flat[name].reshape(-1)[:5] = np.nan
  src = write_t5x(str(tmp_path / "checkpoint_7"), flat)
  line = _one_line_failure(
      capsys, import_cmd.main([f"--t5x_checkpoint={src}", f"--model_dir={tmp_path / 'dest'}",
                               *TINY_GIN]))
  assert "parameter decoder/layers_1/mlp/expert/wi_0/kernel holds 5 non-finite values" in line
  _nothing_written(tmp_path, "checkpoint_7")
  # the optimizer state, when read, is checked too
  from openmoe_jax.interop.hf_import import _fresh_opt_state
  flat[name] = np.zeros_like(flat[name])
  fresh = _fresh_opt_state(traverse_util.unflatten_dict(flat), CFG)
  slots = {}
  for field in ("v_row", "v_col", "v", "m"):
    for path, leaf in traverse_util.flatten_dict(getattr(fresh, field)).items():
      slots.setdefault(path, {})[field] = np.zeros(leaf.shape, np.float32)
  slots[name]["v_row"] = np.full(slots[name]["v_row"].shape, np.inf, np.float32)
  src = write_t5x(str(tmp_path / "with_slots"), flat, slots=slots)
  dest = tmp_path / "dest"
  line = _one_line_failure(capsys, import_cmd.main([
      f"--t5x_checkpoint={src}", f"--model_dir={dest}", *TINY_GIN, "--t5x_optimizer_state"]))
  assert "param_states/decoder/layers_1/mlp/expert/wi_0/kernel/v_row holds" in line, line
  _nothing_written(tmp_path, "checkpoint_7", "with_slots")
