"""Tokens/s of the packed UL2 data pipeline at 2048-token rows (OpenMoE: 1024 inputs + 1024
targets), on the built-in corpus. Prints one JSON object.

  python benchmarks/data_pipeline.py [--mixture_or_task_name=builtin_mix] [--batches=60]

`tokens_per_s` counts row slots (batch x 2048, what the train step consumes); `real_tokens_per_s`
excludes packing padding. Start-up (imports, shuffle-buffer fill) is timed separately.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mixture_or_task_name", default="builtin_mix", help="task or mixture")
  p.add_argument("--batch_size", type=int, default=16, help="rows per batch")
  p.add_argument("--batches", type=int, default=60, help="timed batches")
  p.add_argument("--warmup", type=int, default=5, help="untimed batches after start-up")
  args = p.parse_args()
  t0 = time.perf_counter()
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from openmoe_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top
  it = data.make_iterator(args.mixture_or_task_name, {"inputs": 1024, "targets": 1024},
                          args.batch_size, seed=0, shard_index=0, num_shards=1)
  for _ in range(args.warmup):
    next(it)
  startup = time.perf_counter() - t0
  real = 0
  t1 = time.perf_counter()
  for _ in range(args.batches):
    real += int((next(it)["decoder_segment_ids"] > 0).sum())
  dt = time.perf_counter() - t1
  slots = args.batches * args.batch_size * 2048
  print(json.dumps({
      "benchmark": "data_pipeline_packed_ul2", "mixture_or_task_name": args.mixture_or_task_name,
      "row_length": 2048, "batch_size": args.batch_size, "batches": args.batches,
      "tokens_per_s": round(slots / dt), "real_tokens_per_s": round(real / dt),
      "packing_efficiency": round(real / slots, 4), "startup_s": round(startup, 1),
      "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  main()
