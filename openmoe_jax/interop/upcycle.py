"""Sparse upcycling: an MoE MODEL_DIR from a dense Hugging Face checkpoint (`openmoe-import
--upcycle_from=DENSE_HF_DIR --gin_file=<an MoE model gin> --model_dir=D`).

Komatsuzaki et al. 2022, "Sparse Upcycling" (arXiv:2212.05055; t5x `contrib/moe/configs/runs/
sparse_upcycle.gin`; Megatron-LM `megatron/core/transformer/moe/upcycling_utils.py`): the
embeddings, norms and attention are copied; the experts of a layer come from that layer's dense
FFN; the router is freshly initialised (normal, ROUTER_INIT_STDDEV, from --seed).

Granularity (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts",
arXiv:2410.07524, "virtual groups"; Megatron-LM `upcycling_utils.py`): the dense FFN width F
is cut into G = F / expert_mlp_dim contiguous slices of the hidden units (columns of the gate
and up projections, rows of the down projection); expert e holds slice e mod G, so the E
experts are E / G copies of the dense FFN, copy c being the experts cG .. cG + G - 1. G = 1
(expert width = the dense FFN width) is the classic upcycling: every expert a whole copy.
The router has E / G fresh columns, each repeated for the G experts of its copy, so a copy's
slices always score alike; and the down projections are multiplied by G / routed_scaling_factor
(one linear factor, exact for the gated FFN; Megatron spreads its factor over the gate, up and
down projections as cube roots, which silu(a z) != a silu(z) makes approximate).

When it is exact: the top-k holds whole copies and its gates sum to a constant. The G experts
of a copy score alike, so they are chosen together and get one gate g_c each; with the gates
summing to s = routed_scaling_factor over the k = m G chosen experts, sum_c g_c = s / G over
the m chosen copies. The slices of a copy add up to the dense FFN, so the layer outputs
sum_c g_c (G / s) FFN(x) = FFN(x), and the upcycled model computes the dense model's function
(tests/test_upcycle.py: logits within 1e-5 in float32). The conditions, on the MoE gin:
  * num_experts and num_selected_experts multiples of G, router 'tokens_choose' and, with
    group-limited routing, num_experts / num_expert_groups a multiple of G (each routing group
    holds whole copies);
  * gates summing to a constant over the selected experts: router_score 'softmax_selected'
    (Mixtral) or renormalize_gates (softmax or sigmoid scores);
  * nothing dropped (capacity_mode 'dropless', no_drop, or capacity enough): a run-time
    matter, not checked.
For G > 1 a gin breaking the first two is refused in one line naming the field, nothing
written. G = 1 keeps the classic behaviour and is not refused: with un-renormalised gates a
token's output is the dense FFN times its selected probability mass. Megatron also upcycles
granularly into softmax-then-top-k without renormalisation, scaling the weights by E G / k so
that the output matches the dense one only on average over a uniform router; that is not
function-preserving and is refused here.
Training then moves the experts apart (tests/test_upcycle.py).

Dense layouts read: Llama (`model_type` llama) and Qwen3 (qwen3, per-head QK RMSNorm),
tied embeddings included. The MoE gin must have the dense model's sizes, the gated FFN with an
expert width dividing the dense FFN width, no extra FFN, and the dense model's RoPE theta,
norm epsilon, QK-norm and attention scale; anything else is refused in one line, nothing
written.
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
          "num_layers": hf["num_hidden_layers"], "qk_norm": DENSE_LAYOUTS[kind],
          "mlp_layout": "gated", "moe_extra_mlp": False, "num_shared_experts": 0,
          "kv_lora_rank": 0, "rope_scaling": "none"}  # the dense layouts' attention and RoPE
  if len(cfg.moe_layers) < cfg.num_layers:
    want["mlp_dim"] = hf["intermediate_size"]
  bad = [f"{k} {getattr(cfg, k)} != {v}" for k, v in want.items() if getattr(cfg, k) != v]
  if hf["intermediate_size"] % cfg.expert_mlp_dim:
    bad.append(f"expert_mlp_dim {cfg.expert_mlp_dim} does not divide the dense FFN width "
               f"{hf['intermediate_size']}")
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


def _check_granular(cfg, dense_width: int) -> int:
  """G, the slices each dense FFN is cut into; for G > 1 refuses the routing under which the
  upcycled model would not equal the dense one (module docstring)."""
  g = dense_width // cfg.expert_mlp_dim
  if g == 1:
    return g
  e, k = cfg.num_experts, cfg.num_selected_experts
  bad = []
  if e % g:
    bad.append(f"num_experts {e} is not a multiple of G={g} (E / G copies of the dense FFN)")
  if k % g:
    bad.append(f"num_selected_experts {k} is not a multiple of G={g} (the top-k must hold "
               "whole copies)")
  if cfg.router != "tokens_choose":
    bad.append(f"router {cfg.router!r} is not 'tokens_choose'")
  if cfg.num_expert_groups and (e // cfg.num_expert_groups) % g:
    bad.append(f"num_expert_groups {cfg.num_expert_groups} makes groups of "
               f"{e // cfg.num_expert_groups} experts, not a multiple of G={g}")
  if cfg.router_score != "softmax_selected" and not cfg.renormalize_gates:
    bad.append(f"router_score {cfg.router_score!r} without renormalize_gates: the gates must "
               "sum to a constant (RENORMALIZE_GATES=True or ROUTER_SCORE='softmax_selected')")
  if bad:
    _fail(f"granular upcycling (the dense FFN width {dense_width} cut into G={g} experts of "
          f"expert_mlp_dim {cfg.expert_mlp_dim}) would not equal the dense model: "
          + "; ".join(bad))
  return g


def _experts(array: np.ndarray, name: str, cfg, g: int, dtype) -> np.ndarray:
  """[E, ...] expert kernels from the dense kernel `name` (wi_0 / wi_1 [D, F], wo [F, D]):
  expert e holds slice e mod G of the F hidden units, wo times G / routed_scaling_factor."""
  scale = g / cfg.routed_scaling_factor
  if name == "wo" and scale != 1.0:
    array = np.asarray(array, np.float64) * scale
  array = np.asarray(array).astype(dtype)
  if g == 1:
    return np.broadcast_to(array, (cfg.num_experts, *array.shape))  # whole copies
  slices = np.split(array, g, axis=0 if name == "wo" else 1)
  return np.stack([slices[e % g] for e in range(cfg.num_experts)])


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
  g = _check_granular(cfg, hf["intermediate_size"])
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
      spec = want.get(target)
      if layer is not None and target[2] == "mlp" and cfg.is_moe_layer(int(layer[7:])):
        target = (*target[:3], "expert", *target[3:])
        spec = want.get(target)
        if spec is not None:  # else refused below, with the shapes
          array = _experts(array, target[4], cfg, g, spec.dtype)
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
    if path[-3:] == ("router_weights", "w", "kernel"):  # fresh, one column per copy
      d, e = spec.shape
      fresh = rng.standard_normal((d, e // g)) * cfg.router_init_stddev
      flat[path] = np.repeat(fresh, g, axis=1).astype(spec.dtype)  # expert e: column e // G
    elif path[-1] == "expert_bias":
      flat[path] = np.zeros(spec.shape, spec.dtype)
    else:
      _fail(f"the MoE gin has parameter {'/'.join(path)}, which upcycling from {kind} cannot "
            "fill")
  params = traverse_util.unflatten_dict(flat)
  out = hf_import._commit(model_dir, cfg, params, step,
                          {"upcycled_from": os.path.abspath(dense_dir), "family": kind,
                           "seed": seed, "granularity": g},
                          extra_files=hf_import._tokenizer_files(dense_dir))
  out.update(upcycled_from=dense_dir, dense_model_type=kind, granularity=g)
  return out
