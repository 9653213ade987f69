"""Parameter and FLOP counts of a model, from its abstract parameter shapes (nothing allocated).

Used by openmoe-info, by the training loop (MFU) and by openmoe-import (expected shapes).
"""
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer


def abstract_params(cfg: ModelConfig):
  """Parameter ShapeDtypeStructs of the model, without allocating them."""
  tokens = max(cfg.num_experts, 1) * cfg.num_expert_replicas * 2
  dummy = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  model = Transformer(cfg)
  variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), dummy)
  return jax.tree.map(lambda x: getattr(x, "value", x), variables["params"],
                      is_leaf=lambda x: hasattr(x, "value"))


def summarize(cfg: ModelConfig, seq_len: int = 2048) -> dict:
  """Parameter and FLOP counts. FLOPs per trained token = 6 x activated matmul weights (the
  output head included, the embedding lookup not) + attention 6 * layers * N * (H + V) * seq_len
  (q k^T over H-wide query/key heads and p v over V-wide value heads, forward and backward;
  12 * layers * N*H * seq_len when V = H)."""
  flat = traverse_util.flatten_dict(abstract_params(cfg), sep="/")
  # The loss-free balancing bias is routing state, not a weight (as transformers keeps
  # DeepSeek-V3's `e_score_correction_bias` a buffer): not counted.
  sizes = {k: math.prod(v.shape) for k, v in flat.items() if not k.endswith("/expert_bias")}
  total = sum(sizes.values())
  token_emb = sizes["token_embedder/embedding"]
  head = sizes["decoder/logits_dense/kernel"]
  expert = sum(v for k, v in sizes.items() if "/mlp/expert/" in k)
  e = max(cfg.num_experts, 1)
  # Experts per token: top-k; under expert choice E x C slots for T tokens, C = cf * T / E, so
  # the training capacity factor on average.
  k = cfg.train_capacity_factor if cfg.router == "experts_choose" else cfg.num_selected_experts
  inactive_expert = int(round(expert * (e - k) / e)) if cfg.num_sparse_layers else 0
  activated = total - inactive_expert
  norms = sum(v for key, v in sizes.items() if key.endswith("/scale"))
  matmul_activated = activated - token_emb - norms
  attn = 6 * cfg.num_layers * cfg.num_heads * (cfg.head_dim + cfg.value_head_dim) * seq_len
  return {
      "total_params": total,
      "activated_params": activated,
      "activated_params_without_embeddings": activated - token_emb - head,
      "embedding_params": token_emb + head,
      "token_embedding_params": token_emb,
      "lm_head_params": head,
      "expert_params": expert,
      "moe_layers": list(cfg.moe_layers),
      "num_layers": cfg.num_layers,
      "num_experts": cfg.num_experts,
      "num_selected_experts": cfg.num_selected_experts,
      "seq_len_for_flops": seq_len,
      "train_flops_per_token": 6 * matmul_activated + attn,
      # Of which attention's q k^T and p v over all T keys, forward and backward (PaLM's
      # 12 x layers x heads x head_dim x T, Chowdhery et al. 2022, app. B): a causal kernel
      # computes about half of it.
      "attention_flops_per_token": attn,
  }
