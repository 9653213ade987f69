"""`openmoe-export`: an openmoe_jax checkpoint as a Hugging Face folder in the released layout.

    openmoe-export --model_dir=runs/quickstart --output_dir=hf/quickstart [--step=N]
        [--dtype=float32|bfloat16] [--max_shard_size_mb=5000] [--spm_path=P] [--overwrite]
    openmoe-export --model_dir=runs/quickstart --output_dir=t5x/quickstart --format=t5x

--format=t5x writes O/checkpoint_<step> in OpenMoE's t5x layout instead (`interop/t5x.py`:
msgpack state + one tensorstore zarr array per parameter, t5x `checkpoints.py`), the same
overwrite rules and the same O.tmp-XXXX then rename.

Writes (docs/export.md): safetensors under exactly the released OpenMoE key names and shapes
(`interop/hf/name_map.py`), sharded with `model.safetensors.index.json` above --max_shard_size_mb;
`config.json` (released fields + auto_map), `generation_config.json`, the SentencePiece model
(`tokenizer.model`) with `tokenization_openmoe.py` and `tokenizer_config.json`, and
`modeling_openmoe.py`. Load with `AutoModelForCausalLM.from_pretrained(O,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(O, trust_remote_code=True)`.

Streaming: each tensor is read from the orbax checkpoint on its own (partial restore), converted
and appended to its shard, then dropped. The safetensors header is computed up front from the
checkpoint metadata; transposes and casts go in 64 MiB row blocks, so peak memory is about the
largest tensor plus the libraries, not the model (benchmarks/RESULTS.md). Output goes to O.tmp-XXXX, renamed to O when complete.
"""
import argparse
import json
import sys


from openmoe_jax.interop.hf_export import export  # noqa: F401
from openmoe_jax.interop.hf_export import export_t5x  # noqa: F401
from openmoe_jax.commands import cli
from openmoe_jax.errors import UsageError


def main(argv=None):
  cli.start_command(argv)
  parser = argparse.ArgumentParser(prog="openmoe-export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", required=True, help="a MODEL_DIR written by openmoe-train")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  parser.add_argument("--output_dir", required=True, help="Hugging Face folder to create")
  parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
  parser.add_argument("--max_shard_size_mb", type=float, default=5000,
                      help="start a new safetensors shard above this size (default 5000)")
  parser.add_argument("--spm_path", help="SentencePiece model (default: the run's vocabulary)")
  parser.add_argument("--format", default="hf", choices=("hf", "t5x"),
                      help="hf (default): a Hugging Face folder; t5x: OUTPUT_DIR/checkpoint_<step>"
                           " in OpenMoE's t5x checkpoint layout")
  parser.add_argument("--hf_family", choices=("openmoe", "mixtral", "olmoe", "qwen3_moe"),
                      help="with --format=hf: the Hugging Face layout to write (default: the "
                           "one the model is built like: OpenMoE's own, or the family an "
                           "openmoe-import read); the families' load in transformers without "
                           "trust_remote_code")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an output_dir that an earlier openmoe-export wrote (any "
                           "other non-empty folder, and the model dir, are refused)")
  args = parser.parse_args(argv)

  def body() -> int:
    if args.format == "t5x" and args.hf_family:
      raise UsageError("--hf_family is a Hugging Face layout: it goes with --format=hf")
    if args.format == "t5x":
      out = export_t5x(args.model_dir, args.output_dir, step=args.step, dtype=args.dtype,
                       overwrite=args.overwrite)
    else:
      out = export(args.model_dir, args.output_dir, step=args.step, dtype=args.dtype,
                   max_shard_size_mb=args.max_shard_size_mb, spm_path=args.spm_path,
                   overwrite=args.overwrite, hf_family=args.hf_family)
    print(json.dumps(out), file=sys.stderr)
    return 0

  return cli.run("openmoe-export", body, user_errors=(FileNotFoundError,))


if __name__ == "__main__":
  sys.exit(main())
