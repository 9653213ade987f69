"""How long restarting the input pipeline takes at step 0, 1k and 100k: from the saved tf.data
position (what `openmoe-train` does now) against replaying the stream (what it did before, and
still does for Python-generator sources). Prints one JSON object per step, then a summary.

  python benchmarks/data_resume.py [--steps=0,1000,100000] [--mixture_or_task_name=builtin_mix_full_lm]

The quick-start pipeline by default (built-in corpus, full LM, 128-token rows, 16 rows). One
uninterrupted iterator runs to the largest step, saving its state at each listed step and
keeping the batch that follows; then, for each step, a new iterator is started from that state
(start-up = build + restore + first batch) and its first batch must be bitwise equal to the
uninterrupted run's. `replay_s` is the uninterrupted run's time to reach the step from step 0
(what a replaying resume costs). Imports are warm for every measurement (the first start-up is
not counted), so step 0 is the honest baseline for "as long as starting at step 0".
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mixture_or_task_name", default="builtin_mix_full_lm", help="task or mixture")
  p.add_argument("--targets_length", type=int, default=128, help="row length (full LM)")
  p.add_argument("--batch_size", type=int, default=16, help="rows per batch")
  p.add_argument("--steps", default="0,1000,100000", help="comma-separated resume steps")
  args = p.parse_args()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from openmoe_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top

  make = lambda: data.make_iterator(args.mixture_or_task_name,
                                    {"targets": args.targets_length}, args.batch_size, seed=0,
                                    shard_index=0, num_shards=1)
  steps = sorted(int(s) for s in args.steps.split(","))
  next(make())  # warm imports and caches; not measured
  run, saved, t0 = make(), {}, time.perf_counter()
  for step in range(steps[-1] + 1):
    if step in steps:
      reached = time.perf_counter() - t0
      state, position = run.get_state(), run.save_position()
      saved[step] = (state, position, next(run), reached)  # the batch after `step`
    elif step < steps[-1]:
      next(run)
  rows = []
  for step in steps:
    state, position, want, replay_s = saved[step]
    t = time.perf_counter()
    resumed = make()
    if step:
      resumed.set_state(state, position)
    got = next(resumed)
    startup = time.perf_counter() - t
    equal = all(np.array_equal(got[k], want[k]) for k in data.BATCH_KEYS)
    row = {"benchmark": "data_resume", "mixture_or_task_name": args.mixture_or_task_name,
           "step": step, "resume_s": round(startup, 2), "replay_s": round(replay_s, 2),
           "resumed_by": resumed.resumed_by or "start", "position_bytes": len(position or b""),
           "next_batch_bitwise_equal": bool(equal)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  base = rows[0]["resume_s"]
  print(json.dumps({"benchmark": "data_resume_summary", "startup_at_step_0_s": base,
                    "worst_ratio_to_step_0": round(max(r["resume_s"] for r in rows) / base, 2),
                    "all_bitwise_equal": all(r["next_batch_bitwise_equal"] for r in rows),
                    "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  main()
