"""`openmoe-eval`: loss, perplexity and token accuracy of a saved checkpoint on a split; or, for
an eval task with metrics (downstream.py), its metrics.

    openmoe-eval --gin_file=runs/eval.gin --gin.MODEL_DIR="'runs/quickstart'"
    openmoe-eval --gin.MODEL_DIR="'runs/quickstart'" \
        --gin.MIXTURE_OR_TASK_NAME="'builtin_next_line'" --gin.NUM_SHOTS=2

The model comes from MODEL_DIR/model_config.json (written by openmoe-train); the data from
MIXTURE_OR_TASK_NAME / TASK_FEATURE_LENGTHS (default: what the run trained on). Eval routing
settings apply (EVAL_EXPERT_CAPACITY_FACTOR). Results are printed as JSON and appended to
MODEL_DIR/eval_results.jsonl; metric results also go to TensorBoard
(MODEL_DIR/tensorboard/inference_eval) at the checkpoint's step. Generation is greedy unless
TEMPERATURE > 0; NUM_SAMPLES > 1 draws that many completions per prompt for a task with an
execution hook (humaneval) and reports pass@k for its ks up to NUM_SAMPLES:

    openmoe-eval --gin.MODEL_DIR="'runs/base'" --gin.MIXTURE_OR_TASK_NAME="'humaneval'" \
        --gin.NUM_SAMPLES=200 --gin.TEMPERATURE=0.8 --gin.TOP_P=0.95
"""
import json
import sys


from openmoe_jax import gin_utils
from openmoe_jax.commands import configurables
from openmoe_jax.commands.cli import build_parser, init_distributed, start_command
from openmoe_jax.commands import cli


def main(argv=None):
  start_command(argv)
  parser = build_parser("openmoe-eval", __doc__)

  def body() -> int:
    dot, rest = gin_utils.split_gin_dot_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    init_distributed(args)
    import tasks  # noqa: F401
    gin_utils.parse_gin(args.gin_file or ["runs/eval.gin"], args.gin_bindings + dot,
                        args.gin_search_paths)
    result = configurables.evaluate_checkpoint()
    print(json.dumps(result, indent=2))
    return 0

  return cli.run("openmoe-eval", body)


if __name__ == "__main__":
  sys.exit(main())
