"""OpenMoE's t5x checkpoints in (`openmoe-import --t5x_checkpoint`) and out (`openmoe-export
--format=t5x`), on small checkpoints these tests write in t5x's layout with tensorstore and msgpack
(XueFuzhao/t5x `t5x/checkpoints.py`: `checkpoint` msgpack + one zarr array per parameter)."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization, traverse_util

from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.interop import hf_export as export
from openmoe_jax.commands import export as export_cmd
from openmoe_jax.interop import hf_import
from openmoe_jax.commands import import_model as import_cmd
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer

TINY_GIN = ["--gin_file=models/tiny.gin", "--gin.NUM_EMBEDDINGS=8192"]
CFG = ModelConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                  group_size=64, activation_dtype="float32", scale=1.0, router_init_stddev=1.0)
STEP = 7


def _params(seed=1):
  params = Transformer(CFG).init(jax.random.key(seed), jnp.ones((1, 16), jnp.int32))["params"]
  params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  return traverse_util.flatten_dict(params)


def write_t5x(folder, flat, step=STEP, inline=(), param_states=True, slots=None):
  """A t5x checkpoint as t5x `Checkpointer.save` lays it out, written here independently:
  zarr arrays (gzip) at target.<path> and the msgpack state holding their relative specs
  (or, for paths in `inline`, the array itself, as t5x writes unpartitioned leaves)."""
  os.makedirs(folder)
  target = {}
  for path, array in flat.items():
    name = "target." + ".".join(path)
    if path in inline:
      target[path] = array
      continue
    spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": name},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                         "chunks": list(array.shape)}}
    absolute = dict(spec, kvstore={"driver": "file", "path": os.path.join(folder, name)})
    ts.open(absolute, create=True, open=True).result().write(array).result()
    target[path] = ts.Spec(spec).to_json()
  state = {"step": np.int32(step)}
  if slots is not None:  # {param path: {v_row, v_col, v, m}}, inline
    state["param_states"] = traverse_util.unflatten_dict(slots)
  elif param_states:  # Adafactor slots; never read by the import (specs of absent arrays)
    state["param_states"] = {"decoder": {"v_row": {"driver": "zarr", "dtype": "float32",
                                                   "kvstore": {"driver": "file",
                                                               "path": "state.param_states.x"},
                                                   "metadata": {"shape": [3]}}}}
  blob = serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(target),
                                   "state": state}})
  with open(os.path.join(folder, "checkpoint"), "wb") as f:
    f.write(blob)
  return folder


def _read_t5x(folder):
  """{path: array} from a t5x checkpoint folder, read with tensorstore directly."""
  with open(os.path.join(folder, "checkpoint"), "rb") as f:
    state = serialization.msgpack_restore(f.read())
  out = {}
  for path, leaf in traverse_util.flatten_dict(state["optimizer"]["target"],
                                               is_leaf=lambda _, x: "driver" in x).items():
    spec = dict(leaf, kvstore=dict(leaf["kvstore"]))
    spec["kvstore"]["path"] = os.path.join(folder, spec["kvstore"]["path"])
    out[path] = ts.open(spec).result().read().result()
  return out, state


@pytest.fixture(scope="module")
def t5x_dir(tmp_path_factory):
  flat = _params()
  folder = tmp_path_factory.mktemp("t5x") / f"checkpoint_{STEP}"
  inline = {("decoder", "decoder_norm", "scale")}
  return write_t5x(str(folder), flat, inline=inline), flat


def _import(src, dest, *extra):
  return import_cmd.main([f"--t5x_checkpoint={src}", f"--model_dir={dest}", *TINY_GIN, *extra])


def test_import_then_export_is_bitwise(t5x_dir, tmp_path):
  src, flat = t5x_dir
  dest = tmp_path / "ours"
  assert _import(src, dest) == 0
  params = traverse_util.flatten_dict(ckpt_lib.restore_params(str(dest)))
  assert set(params) == set(flat)
  for path, array in flat.items():
    assert params[path].dtype == np.float32 and np.array_equal(params[path], array), path
  assert ckpt_lib.list_steps(str(dest)) == [STEP]
  out = tmp_path / "t5x_out"
  assert export_cmd.main([f"--model_dir={dest}", f"--output_dir={out}", "--format=t5x"]) == 0
  back, state = _read_t5x(str(out / f"checkpoint_{STEP}"))
  assert state["version"] == 3 and int(state["optimizer"]["state"]["step"]) == STEP
  assert set(back) == set(flat)
  for path, array in flat.items():
    assert back[path].dtype == np.float32 and np.array_equal(back[path], array), path
  # ... and our own reader reads what it wrote, as it reads t5x's.
  again = tmp_path / "again"
  assert _import(out / f"checkpoint_{STEP}", again) == 0
  for path, array in flat.items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(
        ckpt_lib.restore_params(str(again)))[path], array)


def test_a_run_gin_is_accepted_for_its_model(t5x_dir, tmp_path):
  """The run gin a user trained with (it binds `train`, its run macros unset) gives the model:
  the import reads the same parameters as with the model gin alone."""
  src, flat = t5x_dir
  dest = tmp_path / "from_run_gin"
  assert _import(src, dest, "--gin_file=runs/pretrain.gin") == 0
  params = traverse_util.flatten_dict(ckpt_lib.restore_params(str(dest)))
  assert set(params) == set(flat)
  for path, array in flat.items():
    assert np.array_equal(params[path], array), path


def test_ours_to_t5x_to_hf_equals_ours_to_hf(t5x_dir, tmp_path):
  from safetensors.numpy import load_file
  src, _ = t5x_dir
  ours = tmp_path / "ours"
  assert _import(src, ours) == 0
  (ours / "run.json").write_text(json.dumps({"mixture_or_task_name": "builtin_corpus_full_lm"}))
  t5x_out, round_trip = tmp_path / "t5x", tmp_path / "round_trip"
  assert export_cmd.main([f"--model_dir={ours}", f"--output_dir={t5x_out}", "--format=t5x"]) == 0
  assert _import(t5x_out / f"checkpoint_{STEP}", round_trip) == 0
  shutil.copy(ours / "run.json", round_trip / "run.json")
  tensors = []
  for model_dir in (ours, round_trip):
    hf = tmp_path / f"hf_{model_dir.name}"
    assert export_cmd.main([f"--model_dir={model_dir}", f"--output_dir={hf}"]) == 0
    tensors.append(load_file(str(hf / "model.safetensors")))
  assert tensors[0].keys() == tensors[1].keys()
  for k in tensors[0]:
    assert np.array_equal(tensors[0][k], tensors[1][k]), k


def _fails(capsys, argv_fn, *args):
  capsys.readouterr()
  assert argv_fn(*args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith("openmoe-") and len(err[-1]) < 600, err
  return err[-1]


def test_bad_input_is_one_line_and_leaves_nothing(t5x_dir, tmp_path, capsys):
  src, flat = t5x_dir
  dest = tmp_path / "dest"
  # another model size: the gin says 64-wide embeddings, the checkpoint has 32
  line = _fails(capsys, _import, src, dest, "--gin.EMBED_DIM=64")
  assert "shape (32,)" in line and "the model gin wants (64,)" in line
  # a missing and an extra parameter
  fewer = dict(flat)
  del fewer[("decoder", "layers_1", "extra_mlp", "wo", "kernel")]
  line = _fails(capsys, _import, write_t5x(str(tmp_path / "fewer"), fewer), dest)
  assert "lacks parameter decoder/layers_1/extra_mlp/wo/kernel" in line
  more = dict(flat)
  more[("decoder", "layers_9", "mlp", "wo", "kernel")] = np.zeros((2, 2), np.float32)
  line = _fails(capsys, _import, write_t5x(str(tmp_path / "more"), more), dest)
  assert "decoder/layers_9/mlp/wo/kernel" in line
  # a truncated array (its zarr chunk cut short)
  cut = write_t5x(str(tmp_path / "cut"), flat)
  chunk = os.path.join(cut, "target.decoder.layers_0.self_attention.query.kernel", "0.0")
  with open(chunk, "r+b") as f:
    f.truncate(os.path.getsize(chunk) // 2)
  line = _fails(capsys, _import, cut, dest)
  assert "decoder/layers_0/self_attention/query/kernel" in line
  # a folder that is not a t5x checkpoint, and a partial write (msgpack cut short / absent)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "config.json").write_text("{}")
  assert "not a t5x checkpoint" in _fails(capsys, _import, tmp_path / "junk", dest)
  partial = write_t5x(str(tmp_path / "partial"), flat)
  blob = open(os.path.join(partial, "checkpoint"), "rb").read()
  with open(os.path.join(partial, "checkpoint"), "wb") as f:
    f.write(blob[:len(blob) // 2])
  assert "not a t5x checkpoint" in _fails(capsys, _import, partial, dest)
  os.remove(os.path.join(partial, "checkpoint"))
  assert "not a t5x checkpoint" in _fails(capsys, _import, partial, dest)
  assert not dest.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "fewer", "junk", "more",
                                                        "partial"]


def test_export_t5x_bad_input_leaves_nothing(t5x_dir, tmp_path, capsys):
  src, _ = t5x_dir
  ours = tmp_path / "ours"
  assert _import(src, ours) == 0
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "keep.txt").write_text("x")
  argv = lambda *a: export_cmd.main([f"--model_dir={ours}", "--format=t5x", *a])
  assert "exists" in _fails(capsys, argv, f"--output_dir={taken}")
  assert "openmoe-export wrote" in _fails(capsys, argv, f"--output_dir={taken}", "--overwrite")
  assert "step 99" in _fails(capsys, argv, f"--output_dir={tmp_path / 'o'}", "--step=99")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "taken"]
  assert (taken / "keep.txt").read_text() == "x"


def test_released_hf_config_loads_as_is(t5x_dir, tmp_path):
  """The released folders' config.json (model_type 'llama', no AutoConfig entry, none of our
  fields) loads with our modelling code through trust_remote_code, without openmoe-import."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  src, _ = t5x_dir
  ours = tmp_path / "ours"
  assert _import(src, ours) == 0
  (ours / "run.json").write_text(json.dumps({"mixture_or_task_name": "builtin_corpus_full_lm"}))
  hf = tmp_path / "hf"
  assert export_cmd.main([f"--model_dir={ours}", f"--output_dir={hf}"]) == 0
  released = tmp_path / "released"
  shutil.copytree(hf, released)
  config = json.loads((hf / "config.json").read_text())
  for field in ("expert_intermediate_size", "router_capacity_formula", "router_no_drop",
                "router_group_size", "router_renormalize_gates", "moe_float32_output",
                "rms_norm_float32", "attention_float32_logits"):
    del config[field]
  config["auto_map"] = {"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"}
  assert config["model_type"] == "llama"
  (released / "config.json").write_text(json.dumps(config))
  tokens = torch.tensor([[0, 5, 9, 200, 7000, 3, 11]])
  logits = []
  for folder in (hf, released):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
      logits.append(model(tokens, use_cache=False).logits)
  assert type(model.config).__name__ == "OpenMoeConfig"
  torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_optimizer_state_is_read_only_when_asked_for(tmp_path, capsys):
  """--t5x_optimizer_state: t5x's Adafactor slots (same fields and factored shapes as ours)."""
  from openmoe_jax.interop.hf_import import _fresh_opt_state
  flat = _params()
  fresh = _fresh_opt_state(traverse_util.unflatten_dict(flat), CFG)
  rng = np.random.RandomState(0)
  slots, want = {}, {}
  for field in ("v_row", "v_col", "v", "m"):
    for path, leaf in traverse_util.flatten_dict(getattr(fresh, field)).items():
      value = rng.rand(*leaf.shape).astype(np.float32)
      slots.setdefault(path, {})[field] = value
      want[(field,) + path] = value
  src = write_t5x(str(tmp_path / "with_slots"), flat, slots=slots)
  plain, full = tmp_path / "plain", tmp_path / "full"
  assert _import(src, plain) == 0
  assert _import(src, full, "--t5x_optimizer_state") == 0
  opt = traverse_util.flatten_dict(ckpt_lib.restore_params(str(full), params_key="opt_state"))
  fresh_read = traverse_util.flatten_dict(
      ckpt_lib.restore_params(str(plain), params_key="opt_state"))
  assert int(opt[("count",)]) == STEP and int(fresh_read[("count",)]) == 0
  for key, value in want.items():
    np.testing.assert_array_equal(opt[key], value)
    assert not np.any(fresh_read[key])
  # a slot of another shape (factored differently) is one line, nothing written
  path = ("decoder", "layers_0", "mlp", "wi_0", "kernel")
  slots[path] = dict(slots[path], v_row=np.zeros((3,), np.float32))
  bad = write_t5x(str(tmp_path / "bad_slots"), flat, slots=slots)
  line = _fails(capsys, _import, bad, tmp_path / "never", "--t5x_optimizer_state")
  assert "param_states/decoder/layers_0/mlp/wi_0/kernel/v_row" in line
  assert not (tmp_path / "never").exists()
