"""Sparse upcycling: an MoE MODEL_DIR from a dense Hugging Face checkpoint (`openmoe-import
--upcycle_from=DENSE_HF_DIR --gin_file=<an MoE model gin> --model_dir=D`).

Komatsuzaki et al. 2022, "Sparse Upcycling" (arXiv:2212.05055; t5x `contrib/moe/configs/runs/
sparse_upcycle.gin`; Megatron-LM `megatron/core/transformer/moe/upcycling_utils.py`): the
embeddings, norms and attention are copied; every expert of a layer is a copy of that layer's
dense FFN; the router is freshly initialised (normal, ROUTER_INIT_STDDEV, from --seed).
With gates that sum to one over the selected experts (Mixtral's softmax over the selected
logits, or renormalised gates) and nothing dropped, the upcycled model computes exactly the
dense model's function; training then moves the experts apart (tests/test_upcycle.py).

Dense layouts read: Llama (`model_type` llama) and Qwen3 (qwen3, per-head QK RMSNorm),
tied embeddings included. The MoE gin must have the dense model's sizes, the gated FFN with
expert width = the dense FFN width, no extra FFN, and the dense model's RoPE theta, norm
epsilon, QK-norm and attention scale; anything else is refused in one line, nothing written.
"""
import math
import os

import numpy as np

from openmoe_jax import gin_utils
from openmoe_jax.errors import UsageError
from openmoe_jax.interop import hf_import
from openmoe_jax.interop.hf import families
from openmoe_jax.model.counts import abstract_params

DENSE_LAYOUTS = {"llama": "none", "qwen3": "head"}  # model_type -> our qk_norm
_MOE_TYPES = ("mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3")


def _fail(msg):
  raise UsageError(msg)


def _check_dense(hf: dict, dense_dir: str) -> str:
  kind = hf.get("model_type")
  if kind in _MOE_TYPES or "OpenMoeForCausalLM" in (hf.get("architectures") or []):
    _fail(f"--upcycle_from={dense_dir} is an MoE model ({kind}) already: upcycling starts from "
          "a dense one (Llama or Qwen3 layout); import it with --hf_dir")
  if kind not in DENSE_LAYOUTS:
    _fail(f"--upcycle_from={dense_dir}: dense model_type {kind!r} is not a layout upcycling "
          f"reads ({', '.join(DENSE_LAYOUTS)})")
  for key, ok, what in (("hidden_act", lambda v: v == "silu", "an activation other than silu"),
                        ("attention_bias", lambda v: not v, "attention biases"),
                        ("mlp_bias", lambda v: not v, "FFN biases")):
    if key in hf and not ok(hf[key]):
      _fail(f"--upcycle_from={dense_dir}: {key}={hf[key]!r} ({what}) is not supported")
  return kind


def _check_target(cfg, hf: dict, kind: str) -> None:
  """The MoE config must be the dense model's, with experts where its FFNs are."""
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  want = {"vocab_size": hf["vocab_size"], "emb_dim": hf["hidden_size"], "num_heads": heads,
          "kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
          "num_layers": hf["num_hidden_layers"], "expert_mlp_dim": hf["intermediate_size"],
          "qk_norm": DENSE_LAYOUTS[kind], "mlp_layout": "gated", "moe_extra_mlp": False,
          "num_shared_experts": 0}
  if len(cfg.moe_layers) < cfg.num_layers:
    want["mlp_dim"] = hf["intermediate_size"]
  bad = [f"{k} {getattr(cfg, k)} != {v}" for k, v in want.items() if getattr(cfg, k) != v]
  theta = families._rope_theta(hf)
  eps = float(hf.get("rms_norm_eps", 1e-6))
  for name, ours, theirs in (("rope_max_timescale", cfg.rope_max_timescale, theta),
                             ("norm_eps", cfg.norm_eps, eps),
                             ("attention_scale", cfg.attention_scale, head_dim**-0.5)):
    if not math.isclose(ours, theirs, rel_tol=1e-9):
      bad.append(f"{name} {ours} != {theirs}")
  if not cfg.num_sparse_layers:
    bad.append("the gin has no MoE layers")
  if bad:
    _fail("the MoE gin does not match the dense model (" + "; ".join(bad) + ")")


def upcycle(dense_dir: str, model_dir: str, *, gin_files=(), gin_bindings=(), seed: int = 0,
            param_dtype: str = "float32", step: int = 0) -> dict:
  """Writes MODEL_DIR: the MoE model of the gin, upcycled from DENSE_DIR. Raises UsageError."""
  from flax import traverse_util
  hf_import._check_empty(model_dir)
  if not os.path.isdir(dense_dir):
    _fail(f"--upcycle_from not found: {dense_dir}")
  hf = hf_import.read_hf_config(dense_dir)
  kind = _check_dense(hf, dense_dir)
  if not gin_files:
    _fail("--upcycle_from needs the MoE model's --gin_file (e.g. models/qwen3_30b_a3b.gin with "
          "the dense model's sizes)")
  gin_utils.parse_gin(gin_files, gin_bindings, finalize=False)  # a run gin: its model
  cfg = gin_utils.model_config().replace(param_dtype=param_dtype)
  _check_target(cfg, hf, kind)
  want = traverse_util.flatten_dict(abstract_params(cfg))
  dense_cfg = cfg.replace(num_experts=0, num_sparse_layers=0, first_k_dense_layers=0,
                          moe_layer_freq=0, mlp_dim=hf["intermediate_size"], expert_bias=False,
                          expert_bias_update_rate=0.0, num_expert_groups=0, topk_groups=0)
  entries = list(families.tensors("qwen3_moe", dense_cfg))  # the dense layout's names
  files = hf_import.weight_files(dense_dir)
  tied = bool(hf.get("tie_word_embeddings")) and "lm_head.weight" not in files
  if tied:
    entries = [e for e in entries if e.hf_key != "lm_head.weight"]
  missing = [e.hf_key for e in entries if e.hf_key not in files]
  if missing:
    _fail(f"{dense_dir} lacks {len(missing)} {kind} tensors, e.g. {missing[0]}")
  flat, tensors = {}, hf_import._Tensors()
  try:
    for e in entries:
      path = files[e.hf_key]
      stored = tensors.get(path, e.hf_key)
      array = stored.T if e.transpose else stored
      hf_import._check_finite(array, f"{path}: tensor {e.hf_key}",
                              "the file is damaged; download it again")
      target = e.flax_path
      layer = target[1] if target[0] == "decoder" and target[1].startswith("layers_") else None
      if layer is not None and target[2] == "mlp" and cfg.is_moe_layer(int(layer[7:])):
        target = (*target[:3], "expert", *target[3:])  # every expert a copy of the dense FFN
        array = np.broadcast_to(array, (cfg.num_experts, *array.shape))
      spec = want.get(target)
      if spec is None or tuple(spec.shape) != tuple(array.shape):
        _fail(f"{path}: tensor {e.hf_key} has shape {tuple(stored.shape)}, the MoE model needs "
              f"{None if spec is None else tuple(spec.shape)} at {'/'.join(target)}")
      flat[target] = np.ascontiguousarray(array.astype(spec.dtype))
  finally:
    tensors.close()
  if tied:
    flat[("decoder", "logits_dense", "kernel")] = np.ascontiguousarray(
        flat[("token_embedder", "embedding")].T)
  rng = np.random.default_rng(seed)
  for path, spec in want.items():
    if path in flat:
      continue
    if path[-3:] == ("router_weights", "w", "kernel"):  # fresh router
      flat[path] = (rng.standard_normal(spec.shape) * cfg.router_init_stddev).astype(spec.dtype)
    elif path[-1] == "expert_bias":
      flat[path] = np.zeros(spec.shape, spec.dtype)
    else:
      _fail(f"the MoE gin has parameter {'/'.join(path)}, which upcycling from {kind} cannot "
            "fill")
  params = traverse_util.unflatten_dict(flat)
  out = hf_import._commit(model_dir, cfg, params, step,
                          {"upcycled_from": os.path.abspath(dense_dir), "family": kind,
                           "seed": seed},
                          extra_files=hf_import._tokenizer_files(dense_dir))
  out.update(upcycled_from=dense_dir, dense_model_type=kind)
  return out
