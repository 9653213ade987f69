"""openmoe-export / openmoe-import: released HF layout, PyTorch parity, round trip, bad input."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from run_dirs import make_run_dir  # noqa: E402
from openmoe_jax.training import checkpoint as ckpt_lib  # noqa: E402
from openmoe_jax import gin_utils  # noqa: E402
from openmoe_jax.commands import export as export_cmd
from openmoe_jax.interop import hf_import
from openmoe_jax.commands import import_model as import_cmd
from openmoe_jax.model.config import ModelConfig  # noqa: E402
from openmoe_jax.interop.hf import name_map  # noqa: E402
from openmoe_jax.model.counts import abstract_params  # noqa: E402
from openmoe_jax.model.transformer import Transformer  # noqa: E402

# models/tiny.gin with NUM_EMBEDDINGS=8192 (the built-in corpus vocabulary); larger init scales
# so logits and routing are far from uniform and capacity routing really drops assignments.
TINY_GIN = ["--gin_file=models/tiny.gin", "--gin.NUM_EMBEDDINGS=8192"]
CFG = ModelConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                  group_size=64, activation_dtype="float32", scale=1.0, router_init_stddev=1.0)
STEP = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("export") / "run", CFG, step=STEP, seed=1)


@pytest.fixture(scope="module")
def hf_dir(run_dir):
  out = run_dir.parent / "hf"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}",
                      "--max_shard_size_mb=0.5"]) == 0
  return out


def _torch_model(hf_dir, **overrides):
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                              dtype=torch.float32, **overrides).eval()


def _params(model_dir):
  return ckpt_lib.restore_params(str(model_dir))


def test_folder_layout_config_and_tokenizer(hf_dir):
  from safetensors import safe_open
  from transformers import AutoTokenizer
  from openmoe_jax.data import vocab
  index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((hf_dir / s).is_file() for s in shards)
  shapes = {}
  for s in shards:
    with safe_open(hf_dir / s, framework="pt") as f:
      shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
  assert shapes == _released_layout(8192, 32, 2, 16, 64, 2, 8, 2)
  model = _torch_model(hf_dir)  # its own parameters are exactly the file's keys and shapes
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
  config = json.loads((hf_dir / "config.json").read_text())
  assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_openmoe.OpenMoeForCausalLM"
  assert (config["model_type"], config["moe_layer_interval"], config["router_topk"]) == ("llama", 2, 2)
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 0)
  assert config["router_capacity_formula"] == "flaxformer"
  gen = json.loads((hf_dir / "generation_config.json").read_text())
  assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1
  tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
  text = "def add(a, b):\n    return a + b  # sum"
  want = list(vocab.builtin_vocabulary().encode(text))
  assert tok(text, add_special_tokens=False).input_ids == want
  assert tok(text).input_ids == [0] + want  # BOS = pad id 0 prepended, no EOS
  assert tok.decode(want) == text
  assert len(tok) == 8192 and tok.pad_token_id == 0 and tok.eos_token_id == 1
  assert tok.convert_tokens_to_ids("<extra_id_0>") == 8191  # seqio: first sentinel at the top
  assert not list(hf_dir.parent.glob("hf.tmp-*"))


def _log_probs_jax(cfg, params, ids):
  logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(ids))
  return np.asarray(jax.nn.log_softmax(logits, -1))


ROUTER_KEYS = ("router_score", "routed_scaling_factor", "router_num_expert_groups",
               "router_topk_groups", "router_renormalize_gates")


@pytest.mark.parametrize("mode", ["no_drop", "eval_capacity", "colossalai_capacity", "dropless",
                                  "sigmoid_groups", "softmax_selected"])
def test_log_probs_match_jax(run_dir, hf_dir, mode):
  params = _params(run_dir)
  overrides = {"no_drop": dict(no_drop=True), "eval_capacity": {},
               "colossalai_capacity": dict(capacity_formula="colossalai"),
               "dropless": dict(capacity_mode="dropless"),
               # DeepSeek-V3's router (routers.py) in the exported PyTorch code
               "sigmoid_groups": dict(router_score="sigmoid", renormalize_gates=True,
                                      routed_scaling_factor=2.5, num_expert_groups=4,
                                      topk_groups=2, no_drop=True),
               "softmax_selected": dict(router_score="softmax_selected", no_drop=True)}[mode]
  cfg = CFG.replace(**overrides)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 8192, (2, 64))
  ids[:, 0] = 0  # BOS = pad id 0
  want = _log_probs_jax(cfg, params, ids)
  if mode == "eval_capacity":  # capacity must bind, else this equals the no-drop case
    assert np.abs(want - _log_probs_jax(CFG.replace(no_drop=True), params, ids)).max() > 1e-2
  exported = name_map.hf_config(cfg)  # what openmoe-export writes for this configuration
  model = _torch_model(hf_dir, router_no_drop=exported["router_no_drop"],
                       router_capacity_formula=exported["router_capacity_formula"],
                       **{key: exported[key] for key in ROUTER_KEYS})
  with torch.no_grad():
    got = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  if overrides.get("router_score", "softmax") != "softmax":  # the router changes the model
    assert np.abs(want - _log_probs_jax(CFG.replace(no_drop=True), params, ids)).max() > 1e-3
  # config.json carries the router both ways
  assert name_map.model_config_fields(exported)["router_score"] == cfg.router_score


def test_greedy_generate_matches_jax_greedy_decoding(run_dir, hf_dir):
  # Cached decoding routes one token per step; with no-drop routing that equals routing the
  # whole prefix, which is what the JAX decoder below does every step.
  params = _params(run_dir)
  cfg = CFG.replace(no_drop=True)
  fn = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
  model = _torch_model(hf_dir, router_no_drop=True)
  for prompt in ([0], [0, 291, 717, 268, 331], [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]):
    seq = list(prompt)
    for _ in range(8):
      length = -(-len(seq) // 8) * 8  # the group rule wants a multiple of E tokens
      x = np.zeros((1, length), np.int32)
      x[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(fn(params, x))[0, len(seq) - 1])))
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out[0].tolist() == seq


def test_bfloat16_export(run_dir, tmp_path):
  import ml_dtypes
  from safetensors import safe_open
  out = tmp_path / "bf16"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}", "--dtype=bfloat16"]) == 0
  assert not (out / "model.safetensors.index.json").exists()
  params = _params(run_dir)
  with safe_open(out / "model.safetensors", framework="pt") as f:
    q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    wi = f.get_tensor("model.layers.1.mlp.experts.wi_gate")
  assert q.dtype == torch.bfloat16
  layer = params["decoder"]["layers_1"]
  want_q = layer["self_attention"]["query"]["kernel"].T.astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(q.view(torch.int16).numpy(), want_q.view(np.int16))
  want_wi = layer["mlp"]["expert"]["wi_0"]["kernel"].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(wi.view(torch.int16).numpy(), want_wi.view(np.int16))
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _released_layout(vocab, d, heads, head_dim, f, layers, experts, interval):
  """Key -> shape of the released OpenMoE checkpoints, written out by hand from ColossalAI's `convert_openmoe_ckpt.py`."""
  joined = heads * head_dim
  keys = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
          "lm_head.weight": (vocab, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    keys.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                 p + "self_attn.q_proj.weight": (joined, d), p + "self_attn.k_proj.weight": (joined, d),
                 p + "self_attn.v_proj.weight": (joined, d), p + "self_attn.o_proj.weight": (d, joined)})
    dense = {"gate_proj.weight": (2 * f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
    if (i + 1) % interval == 0:
      keys.update({p + "mlp.gate_weight": (experts, d),
                   p + "mlp.experts.wi_gate": (experts, d, 2 * f),
                   p + "mlp.experts.wi_up": (experts, d, f), p + "mlp.experts.wo": (experts, f, d),
                   p + "pre_extra_mlp_layernorm.weight": (d,)})
      keys.update({p + "extra_mlp." + k: v for k, v in dense.items()})
    else:
      keys.update({p + "mlp." + k: v for k, v in dense.items()})
  return keys


RELEASED = {  # OrionZheng/openmoe-{base,8b,34b-200B} config.json: (gin, d, heads, head_dim, d_ff, layers, experts, interval)
    "base": ("models/openmoe_base.gin", 768, 12, 64, 2048, 12, 16, 4),
    "8b": ("models/openmoe_8b.gin", 2048, 24, 128, 8192, 24, 32, 6),
    "34b": ("models/openmoe_34b.gin", 3072, 24, 128, 12288, 32, 32, 4),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_layout_abstractly(name):
  from flax import traverse_util
  gin_file, d, heads, head_dim, f, layers, experts, interval = RELEASED[name]
  gin_utils.parse_gin([gin_file], [])
  cfg = gin_utils.model_config()
  flat = traverse_util.flatten_dict(abstract_params(cfg))  # shapes only, nothing allocated
  entries = list(name_map.entries(cfg.num_layers, cfg.is_moe_layer))
  assert {e.flax_path for e in entries} == set(flat)  # every parameter mapped exactly once
  got = {e.hf_key: name_map.hf_shape(flat[e.flax_path].shape, e.transpose) for e in entries}
  assert got == _released_layout(256384, d, heads, head_dim, f, layers, experts, interval)
  config = name_map.hf_config(cfg)
  want = {"vocab_size": 256384, "hidden_size": d, "intermediate_size": f,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
          "head_dim": head_dim, "num_experts": experts, "moe_layer_interval": interval,
          "router_topk": 2, "router_capacity_factor_train": 1.25,
          "router_capacity_factor_eval": 2.0, "router_min_capacity": 4, "rope_theta": 10000.0,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "swiglu",
          "mlp_gated": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
          "architectures": ["OpenMoeForCausalLM"], "model_type": "llama"}
  assert {k: config[k] for k in want} == want
  from openmoe_jax.interop.hf.modeling_openmoe import OpenMoeConfig, OpenMoeForCausalLM
  with torch.device("meta"):  # the PyTorch model declares the same keys and shapes
    model = OpenMoeForCausalLM(OpenMoeConfig(**config))
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == got
  assert name_map.shape_mismatch(ModelConfig(**name_map.model_config_fields(config)), cfg) == []


def test_round_trip_is_bitwise_and_trainable(run_dir, hf_dir, tmp_path):
  from test_train import _run
  imported = tmp_path / "imported"
  assert import_cmd.main([f"--hf_dir={hf_dir}", f"--model_dir={imported}", *TINY_GIN]) == 0
  a, b = _params(run_dir), _params(imported)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y)
  # openmoe-train fine-tunes from it (initial_checkpoint_dir: params + fresh optimizer state).
  tuned = tmp_path / "tuned"
  r = _run(tuned, "--gin.TRAIN_STEPS=1", "--gin.CHECKPOINT_PERIOD=1",
           f"--gin.train.initial_checkpoint_dir='{imported}'")
  assert r.returncode == 0, r.stderr[-2000:]
  assert ckpt_lib.list_steps(str(tuned)) == [1]


def test_import_released_config_without_our_fields(run_dir, hf_dir, tmp_path):
  released = tmp_path / "released"
  released.mkdir()
  for p in hf_dir.iterdir():
    if p.name != "config.json":
      (released / p.name).symlink_to(p)
  config = json.loads((hf_dir / "config.json").read_text())
  for ours in ("expert_intermediate_size", "router_capacity_formula", "router_no_drop",
               "router_group_size", "router_renormalize_gates"):
    del config[ours]
  config["auto_map"] = {"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"}
  (released / "config.json").write_text(json.dumps(config))
  dest = tmp_path / "dest"
  assert import_cmd.main([f"--hf_dir={released}", f"--model_dir={dest}"]) == 0
  got = json.loads((dest / "model_config.json").read_text())
  assert name_map.shape_mismatch(ModelConfig(**got), CFG) == []
  assert got["group_size"] == 4096 and got["capacity_formula"] == "flaxformer"
  for x, y in zip(jax.tree.leaves(_params(run_dir)), jax.tree.leaves(_params(dest))):
    assert np.array_equal(x, y)


def test_import_to_a_url_model_dir_writes_in_place(run_dir, hf_dir, tmp_path, monkeypatch):
  # Object stores cannot rename a folder, so a URL MODEL_DIR (gs://) is written in place, with no
  # MODEL_DIR.tmp-* beside it. A local path stands in for the URL (orbax's etils.epath knows no
  # in-memory ram://): with fs.is_url forced, fs goes through tf.io.gfile, which takes it too.
  from openmoe_jax import fs
  dest = tmp_path / "bucket" / "imported"
  monkeypatch.setattr(fs, "is_url", lambda path: True)
  assert import_cmd.main([f"--hf_dir={hf_dir}", f"--model_dir={dest}", *TINY_GIN]) == 0
  monkeypatch.undo()
  assert os.listdir(tmp_path / "bucket") == ["imported"]
  assert sorted(os.listdir(dest)) == ["checkpoints", "imported_from.json", "model_config.json",
                                      "vocabulary.json"]
  assert name_map.shape_mismatch(
      ModelConfig(**json.loads((dest / "model_config.json").read_text())), CFG) == []
  for x, y in zip(jax.tree.leaves(_params(run_dir)), jax.tree.leaves(_params(dest))):
    assert np.array_equal(x, y)


def _last_error(capsys, prog):
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith(f"{prog}: error: "), err
  return err[-1]


def test_cli_error_is_one_line(tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "openmoe_jax.commands.export", f"--model_dir={tmp_path}",
                      f"--output_dir={tmp_path / 'o'}"], capture_output=True, text=True,
                     timeout=120, cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("openmoe-export: error: "), r.stderr


def test_export_bad_input(run_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert export_cmd.main([f"--model_dir={tmp_path / 'missing'}", f"--output_dir={out}"]) == 2
  assert "model_config.json" in _last_error(capsys, "openmoe-export")
  assert export_cmd.main([f"--model_dir={run_dir}", "--step=7", f"--output_dir={out}"]) == 2
  assert "step 7" in _last_error(capsys, "openmoe-export")
  assert export_cmd.main([f"--model_dir={run_dir}", "--dtype=float16", f"--output_dir={out}"]) == 2
  _last_error(capsys, "openmoe-export")
  assert not out.exists()
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}"]) == 2
  assert "--overwrite" in _last_error(capsys, "openmoe-export")
  assert os.listdir(out) == ["keep.txt"]
  # --overwrite replaces only what openmoe-export wrote: a user's folder is refused, kept.
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}", "--overwrite"]) == 2
  assert "not one" in _last_error(capsys, "openmoe-export")
  assert os.listdir(out) == ["keep.txt"]
  done = tmp_path / "done"
  old_umask = os.umask(0o022)
  try:
    assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={done}"]) == 0
    assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={done}", "--overwrite"]) == 0
  finally:
    os.umask(old_umask)
  assert (done / "model.safetensors").is_file()
  assert (done.stat().st_mode & 0o777) == 0o755  # the umask's mode, not mkdtemp's 0700
  assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "out"]  # no tmp folders left


def test_export_never_touches_the_model_dir(run_dir, capsys):
  """The model dir, a folder holding it (its parent) and a folder inside it are refused, even
  with --overwrite, and nothing in or around the run changes."""
  run_dir = pathlib.Path(run_dir)
  before = sorted(str(p) for p in run_dir.parent.rglob("*"))
  for out, word in ((run_dir, "is the model dir"), (run_dir.parent, "contains the model dir"),
                    (run_dir / "hf", "is inside the model dir")):
    for extra in ([], ["--overwrite"]):
      assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={out}", *extra]) == 2
      assert word in _last_error(capsys, "openmoe-export")
  assert sorted(str(p) for p in run_dir.parent.rglob("*")) == before


def test_import_bad_input(hf_dir, tmp_path, capsys):
  dest = tmp_path / "dest"
  not_openmoe = tmp_path / "llama"
  not_openmoe.mkdir()
  (not_openmoe / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32}))
  cases = [
      ([f"--hf_dir={tmp_path / 'nowhere'}"], "not found"),
      ([f"--hf_dir={not_openmoe}"], "not an OpenMoE"),
      ([f"--hf_dir={hf_dir}", "--gin_file=models/tiny.gin"], "vocab_size: 512 != 8192"),
      ([f"--hf_dir={hf_dir}", *TINY_GIN, "--gin.NUM_EXPERTS=4"], "num_experts"),
  ]
  for args, message in cases:
    assert import_cmd.main([*args, f"--model_dir={dest}"]) == 2, args
    assert message in _last_error(capsys, "openmoe-import"), args
  # Weights of another model under a matching config.json: refused, nothing written.
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  for p in hf_dir.iterdir():
    if p.suffix != ".json" or p.name == "config.json":
      (wrong / p.name).symlink_to(p)
  index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
  index["weight_map"].pop("lm_head.weight")
  (wrong / "model.safetensors.index.json").write_text(json.dumps(index))
  assert import_cmd.main([f"--hf_dir={wrong}", f"--model_dir={dest}"]) == 2
  assert "lm_head.weight" in _last_error(capsys, "openmoe-import")
  (dest / "x").parent.mkdir()
  (dest / "x").write_text("")
  assert import_cmd.main([f"--hf_dir={hf_dir}", f"--model_dir={dest}"]) == 2
  assert "not empty" in _last_error(capsys, "openmoe-import")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "llama", "wrong"]


def test_import_released_pytorch_bin_shards(run_dir, hf_dir, tmp_path):
  """The released repos ship pytorch_model-0000x-of-0000y.bin with an index: import those too."""
  import torch
  from safetensors.torch import load_file
  released = tmp_path / "released_bin"
  released.mkdir()
  (released / "config.json").write_text((hf_dir / "config.json").read_text())
  tensors = {}
  for f in sorted(hf_dir.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
  keys = sorted(tensors)
  half = len(keys) // 2
  weight_map = {}
  for i, part in enumerate((keys[:half], keys[half:])):
    name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
    torch.save({k: tensors[k] for k in part}, released / name)
    weight_map.update({k: name for k in part})
  (released / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  dest = tmp_path / "from_bin"
  assert import_cmd.main([f"--hf_dir={released}", f"--model_dir={dest}"]) == 0
  for x, y in zip(jax.tree.leaves(_params(run_dir)), jax.tree.leaves(_params(dest))):
    assert np.array_equal(x, y)


def test_a_failed_import_to_a_url_leaves_nothing(run_dir, hf_dir, tmp_path, monkeypatch, capsys):
  # As above, a local path stands in for the bucket; the write fails after the checkpoint.
  from openmoe_jax import fs
  dest = tmp_path / "bucket" / "imported"
  monkeypatch.setattr(fs, "is_url", lambda path: True)
  real_write = fs.write_text

  def failing_write(path, text):
    if str(path).endswith("model_config.json"):
      raise OSError("bucket went away")
    real_write(path, text)
  monkeypatch.setattr(fs, "write_text", failing_write)
  with pytest.raises(OSError, match="bucket went away"):
    hf_import.import_checkpoint(str(hf_dir), str(dest), gin_files=["models/tiny.gin"],
                                 gin_bindings=["NUM_EMBEDDINGS=8192"])
  assert not dest.exists()
  # A folder a killed import left (no model_config.json) is named as such by a rerun.
  monkeypatch.undo()
  dest.mkdir(parents=True)
  (dest / "imported_from.json").write_text("{}")
  assert import_cmd.main([f"--hf_dir={hf_dir}", f"--model_dir={dest}", *TINY_GIN]) == 2
  assert "unfinished import" in capsys.readouterr().err.strip().splitlines()[-1]


def test_overwrite_renames_the_old_export_aside_first_and_leftovers_are_said(run_dir, tmp_path,
                                                                             capsys, monkeypatch):
  """--overwrite moves the earlier export aside before the new one is renamed in: a failure
  between the two renames leaves it under its aside name, complete. The next export names the
  folders an interrupted export left (kept, for the user to delete)."""
  from openmoe_jax.interop import hf_export
  done = tmp_path / "done"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={done}"]) == 0
  first = (done / "model.safetensors").read_bytes()
  real_replace, calls = os.replace, []

  def dies_on_the_second_rename(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:
      raise KeyboardInterrupt  # killed between moving the old export aside and the new one in
    return real_replace(src, dst)

  monkeypatch.setattr(hf_export.os, "replace", dies_on_the_second_rename)
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={done}", "--overwrite"]) == 130
  monkeypatch.setattr(hf_export.os, "replace", real_replace)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("done.old-")]
  assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == first
  capsys.readouterr()
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={tmp_path / 'done'}",
                          "--overwrite"]) == 0
  err = capsys.readouterr().err
  assert f"{aside[0]} is an earlier export renamed aside by an interrupted --overwrite" in err
  assert aside[0].exists()  # said, not deleted
