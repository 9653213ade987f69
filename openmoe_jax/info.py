"""`openmoe-info`: builds a model from gin abstractly (no parameter memory) and prints its counts.

    openmoe-info --gin_file=models/openmoe_8b.gin
    openmoe-info --gin_file=models/tiny.gin --gin.NUM_EXPERTS=16

Prints one JSON object. Counts come from the parameter shapes of the Flax model itself.
"""
import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
from flax import traverse_util

from openmoe_jax import gin_utils
from openmoe_jax.config import ModelConfig
from openmoe_jax.model import Transformer


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
  output head included, the embedding lookup not) + attention 12 * layers * N*H * seq_len."""
  flat = traverse_util.flatten_dict(abstract_params(cfg), sep="/")
  sizes = {k: math.prod(v.shape) for k, v in flat.items()}
  total = sum(sizes.values())
  token_emb = sizes["token_embedder/embedding"]
  head = sizes["decoder/logits_dense/kernel"]
  expert = sum(v for k, v in sizes.items() if "/mlp/expert/" in k)
  k, e = cfg.num_selected_experts, max(cfg.num_experts, 1)
  inactive_expert = expert * (e - k) // e if cfg.num_sparse_layers else 0
  activated = total - inactive_expert
  norms = sum(v for key, v in sizes.items() if key.endswith("/scale"))
  matmul_activated = activated - token_emb - norms
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
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
  }


def main(argv=None):
  parser = argparse.ArgumentParser(prog="openmoe-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--seq_len", type=int, default=2048,
                      help="sequence length used for the attention FLOPs (default 2048)")
  try:
    dot_bindings, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    if not args.gin_file:
      raise gin_utils.UsageError("--gin_file is required, e.g. --gin_file=models/openmoe_8b.gin")
    gin_utils.parse_gin(args.gin_file, args.gin_bindings + dot_bindings, args.gin_search_paths)
    cfg = gin_utils.model_config()
  except gin_utils.UsageError as e:
    print(f"openmoe-info: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summarize(cfg, args.seq_len), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
