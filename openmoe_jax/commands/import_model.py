"""`openmoe-import`: a Hugging Face OpenMoE folder (ours or the released one) as a checkpoint.

    openmoe-import --hf_dir=hf/openmoe-8b --model_dir=runs/from_hf \
        [--gin_file=models/openmoe_8b.gin] [--step=0] [--param_dtype=float32]
    openmoe-import --t5x_checkpoint=gs_copy/openmoe_8b/checkpoint_1000000 \
        --gin_file=models/openmoe_8b.gin --model_dir=runs/from_t5x [--gin.X=V ...]
    openmoe-import --hf_dir=hf/Mixtral-8x7B-v0.1 --model_dir=runs/mixtral
        # also olmoe, qwen3_moe, deepseek_v2, deepseek_v3
    openmoe-import --upcycle_from=hf/Qwen3-1.7B --gin_file=my_qwen3_moe.gin --model_dir=runs/up

--hf_dir reads OpenMoE's layout or a Mixtral / OLMoE / Qwen3-MoE / DeepSeek-V2 / DeepSeek-V3
folder, recognised from config.json's model_type (docs/models.md; DeepSeek-V3's
multi-token-prediction layers are left out, as transformers leaves them). --upcycle_from makes the MoE of --gin_file from a
dense Llama or Qwen3 folder (sparse upcycling, Komatsuzaki et al. 2022): embeddings, norms and
attention copied, each expert a copy of its layer's FFN, routers fresh from --seed; with an
EXPERT_MLP_DIM narrower than the dense FFN (a divisor of it), each expert one of its G slices
(granular upcycling, He et al. 2024: the router ties a copy's slices; exact when the top-k holds
whole copies and its gates sum to a constant; docs/models.md).

--t5x_checkpoint reads OpenMoE's t5x checkpoints (`interop/t5x.py`: the msgpack `checkpoint`
file and its tensorstore arrays, t5x `checkpoints.py`), one array at a time, every shape checked
against the model gin (required: shapes alone cannot tell heads from head_dim); the optimizer
state in it is not read (a fresh one is written) unless --t5x_optimizer_state (t5x's Adafactor
slots, checked against ours). The step is the checkpoint's unless --step.

Reads the safetensors (single file or sharded with model.safetensors.index.json) or the
PyTorch pickles of the released repos (pytorch_model.bin, sharded or not) under the
released key names (`interop/hf/name_map.py`), maps them back onto our Flax parameter tree and writes
MODEL_DIR/checkpoints/<step> = {"step", "params", "opt_state"} (a fresh OpenMoE Adafactor state)
with an empty data state, plus model_config.json. Fine-tune from it with
`--gin_file=runs/finetune.gin --gin.INITIAL_CHECKPOINT_DIR="'MODEL_DIR'"` and the matching
model gin. Without --gin_file the model config comes from config.json; with it, the gin's
shapes must agree with config.json. A local MODEL_DIR is written to MODEL_DIR.tmp-XXXX first and
renamed, so a failure leaves nothing behind; a URL MODEL_DIR (gs://...) is written in place,
model_config.json last, and removed again when the import fails (a killed import leaves a
folder without model_config.json, which no tool reads as a model dir and a rerun names).

Every import records the model's vocabulary in MODEL_DIR/vocabulary.json, which openmoe-score
and openmoe-infer use when not given --mixture_or_task_name: a Hugging Face folder's tokenizer
files (kept in MODEL_DIR/hf_tokenizer) as {"kind": "hf_tokenizer", "path": "hf_tokenizer"};
OpenMoE's checkpoints (--hf_dir in OpenMoE's layout, --t5x_checkpoint) umT5's SentencePiece
with 300 extra ids, {"kind": "sentencepiece", "model": "umt5", "extra_ids": 300}, found when a
tool needs it through $OPENMOE_SPM_PATH (or the gin binding openmoe_jax.vocab.umt5_spm_path.path).
A folder without tokenizer files (or whose tokenizer does not load) records none: the summary
printed last says so in its "note".
"""
import argparse
import json
import sys


from openmoe_jax import gin_utils
from openmoe_jax.errors import UsageError
from openmoe_jax.interop.hf_import import import_checkpoint  # noqa: F401
from openmoe_jax.interop.hf_import import import_t5x  # noqa: F401
from openmoe_jax.interop.upcycle import upcycle
from openmoe_jax.commands import cli
# A run gin (quickstart.gin) binds `train`: registered at import, before any gin is parsed
# (gin refuses new configurables once a config is locked); only the model is read.
from openmoe_jax.commands import configurables  # noqa: F401


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="openmoe-import", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf_dir", help="Hugging Face OpenMoE folder")
  source.add_argument("--t5x_checkpoint", help="an OpenMoE t5x checkpoint folder (checkpoint_N)")
  source.add_argument("--upcycle_from", metavar="DENSE_HF_DIR",
                      help="sparse upcycling: a dense Hugging Face folder (Llama or Qwen3 "
                           "layout) made into the MoE of --gin_file, every expert a copy of "
                           "its layer's FFN or, when the gin's EXPERT_MLP_DIM divides the "
                           "dense width into G slices, one slice of a copy (granular), the "
                           "router fresh (interop/upcycle.py)")
  parser.add_argument("--model_dir", required=True, help="new openmoe_jax MODEL_DIR")
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--step", type=int,
                      help="step to record (default: 0 for --hf_dir, the checkpoint's for t5x)")
  parser.add_argument("--param_dtype", default="float32", help="stored parameter dtype")
  parser.add_argument("--seed", type=int, default=0,
                      help="with --upcycle_from: the seed of the fresh routers (default 0)")
  parser.add_argument("--t5x_optimizer_state", action="store_true",
                      help="with --t5x_checkpoint: also read its Adafactor state (default: fresh)")

  def body() -> int:
    bindings, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    kw = dict(gin_files=args.gin_file, gin_bindings=args.gin_bindings + bindings,
              param_dtype=args.param_dtype)
    if args.t5x_optimizer_state and not args.t5x_checkpoint:
      raise UsageError("--t5x_optimizer_state needs --t5x_checkpoint")
    if args.upcycle_from:
      out = upcycle(args.upcycle_from, args.model_dir, step=args.step or 0, seed=args.seed, **kw)
    elif args.t5x_checkpoint:
      out = import_t5x(args.t5x_checkpoint, args.model_dir, step=args.step,
                       optimizer_state=args.t5x_optimizer_state, **kw)
    else:
      out = import_checkpoint(args.hf_dir, args.model_dir, step=args.step or 0, **kw)
    print(json.dumps(out), file=sys.stderr)
    return 0

  return cli.run("openmoe-import", body, user_errors=(ValueError,))


if __name__ == "__main__":
  sys.exit(main())
