"""The longest sequence the quick-start model's training step fits in a host memory budget, with
dense against chunked attention (XLA:CPU, compile only: the peak is the compiled program's
buffer assignment, what a run allocates), then one real step at each implementation's longest
length (at most --run_max_len) to show it trains.

    python benchmarks/cpu_longest_sequence.py                      # quickstart.gin, 24 GiB
    python benchmarks/cpu_longest_sequence.py --batch_size 1 --budget_gib 24 --max_len 131072

Lengths double from --min_len; a length whose step does not fit (or fails to compile) ends that
implementation's search. Prints one JSON line per compiled length, then a summary line.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _setup(gin_file: str, impl: str):
  from openmoe_jax import gin_utils
  import tasks  # noqa: F401  the run gins import it
  from openmoe_jax.commands import configurables  # noqa: F401  registers `train`
  from openmoe_jax.commands import compile_only
  gin_utils.parse_gin([gin_file], [f"ATTENTION_IMPL='{impl}'"], finalize=False)
  return gin_utils.model_config(), compile_only.train_settings()


def _step(cfg, settings, batch_size, length, run_it: bool):
  import jax
  from openmoe_jax.training import run_setup
  from openmoe_jax.training import state_layout as layout
  run = run_setup.build(cfg, batch_size=batch_size, seq_len=length,
                        optimizer=settings["optimizer"],
                        optimizer_kwargs=settings["optimizer_kwargs"],
                        devices=jax.devices()[:1])
  res = layout.compile_train_step(run.cfg, run.tx, run.schedule, run.mesh,
                                  batch_size=batch_size, length=length, rules=run.rules)
  if run_it:
    res["step_seconds"] = _run_one_step(run, batch_size, length)
  return res


def _run_one_step(run, batch_size, length) -> float:
  """One real training step (a fresh init, one packed row of random tokens per batch row, as
  the data pipeline makes them): its wall seconds, compile excluded."""
  import jax
  import numpy as np
  from openmoe_jax.training import state_layout as layout
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.training import steps
  lowered, abstract = layout.lower_train_step(run.cfg, run.tx, run.schedule, run.mesh,
                                              batch_size=batch_size, length=length,
                                              rules=run.rules)
  compiled = lowered.compile()
  state = jax.jit(lambda r: part.unbox(steps.init_state(run.cfg, run.tx, r, batch_size, length)),
                  out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(
                      jax.random.key(0))
  rng = np.random.default_rng(0)
  targets = rng.integers(1, run.cfg.vocab_size, (batch_size, length)).astype(np.int32)
  batch = {"decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": np.ones((batch_size, length), np.float32),
           "decoder_segment_ids": np.ones((batch_size, length), np.int32),
           "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                                (batch_size, length)).copy()}
  t = time.perf_counter()
  jax.block_until_ready(compiled(state, batch))
  return round(time.perf_counter() - t, 1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", default="quickstart.gin", help="the run gin (default: quickstart)")
  p.add_argument("--batch_size", type=int, default=1, help="rows per step (default 1)")
  p.add_argument("--budget_gib", type=float, default=24.0, help="host memory budget (GiB)")
  p.add_argument("--min_len", type=int, default=1024, help="first length tried")
  p.add_argument("--max_len", type=int, default=262144, help="last length tried")
  p.add_argument("--impls", default="dense,chunked", help="comma-separated ATTENTION_IMPLs")
  p.add_argument("--no_run", action="store_true", help="compile only, no real step")
  p.add_argument("--run_max_len", type=int, default=16384,
                 help="the real step runs at min(longest, this) (default 16384: a step at 128k "
                      "tokens would take hours on 2 cores)")
  args = p.parse_args(argv)
  budget = args.budget_gib * 2**30
  summary = {"gin_file": args.gin_file, "batch_size": args.batch_size,
             "budget_gib": args.budget_gib, "longest": {}}
  for impl in args.impls.split(","):
    cfg, settings = _setup(args.gin_file, impl)
    length, best = args.min_len, None
    while length <= args.max_len:
      try:
        res = _step(cfg, settings, args.batch_size, length, run_it=False)
        fits = res["peak_bytes_per_device"] <= budget
      except Exception as e:  # pylint: disable=broad-except  (the end of the search)
        res, fits = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, False
      print(json.dumps({"attention_impl": impl, "seq_len": length, "fits": fits,
                        "peak_gib": round(res.get("peak_bytes_per_device", 0) / 2**30, 2),
                        "temp_gib": round(res.get("temp_bytes_per_device", 0) / 2**30, 2),
                        **({"error": res["error"]} if "error" in res else {})}), flush=True)
      if not fits:
        break
      best, length = length, length * 2
    entry = {"seq_len": best}
    if best and not args.no_run:
      entry["ran_at"] = min(best, args.run_max_len)
      entry["one_step_seconds"] = _step(cfg, settings, args.batch_size, entry["ran_at"],
                                        run_it=True)["step_seconds"]
    summary["longest"][impl] = entry
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
