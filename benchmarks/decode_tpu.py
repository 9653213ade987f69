"""Cached decoding compiled for a TPU slice by XLA:TPU (libtpu), one JSON line per configuration.

    .venv/bin/python benchmarks/decode_tpu.py --case "models/small.gin v4-8 1" \
        --case "models/small.gin v4-8 32"
    .venv/bin/python benchmarks/decode_tpu.py --case "models/openmoe_base.gin v4-8 32 expert=8"
    .venv/bin/python benchmarks/decode_tpu.py --table decode.jsonl   # the markdown table

A case is "<model gin> <slice> <batch> [expert=E] [model=M] [MACRO=value ...]": the model of a
gin under gin/ (`models/small.gin` is the quick start's), a TPU slice (`openmoe_jax/planning/tpu.py`),
the number of prompts decoded together, the mesh's expert / model partitions (default 1 / 1:
every device on `data`, as `openmoe-infer` builds its mesh) and gin macro overrides. Nothing runs
on a TPU: the programs are compiled from abstract shapes for the slice's compile-only devices
(`jax.experimental.topologies`), as `openmoe_jax/planning/plan.py` compiles the train step, and
every time below is a **compiler estimate**.

Compiled per case, all with decoding.py's own code under the training mesh and axis rules
(parameters as `decoding.place_params` places them, the cache sharded over batch and heads):
  * `step`: one decoding step, what each iteration of generate's loop does: pick the next token
    from the last logits (`decoding.sample`), run it through the model with a KV cache of
    --cache_len columns (cache donated: updated in place). Its estimate is the headline:
    estimated tokens/s = batch / step seconds. A step attends over every cache column (masked),
    so its cost does not depend on how full the cache is;
  * `prefill`: `decoding.prefill` jitted, for a P = --prompt_len token prompt bucket;
  * `decode`: the whole program `decoding.generate` runs (`decoding._compiled`: the prefill,
    then the `while_loop` of steps) for a cache of P + N = --cache_len columns.
The step time is the compiler's `optimal_seconds`, or, where this libtpu's cost model gives none
(v4 for these programs; v5p and v6e for the train step), the roofline max(flops / peak FLOP/s, bytes accessed / HBM bandwidth) of
XLA's own counts (as `openmoe_jax/planning/plan.py` does), marked "roofline". Two cross-checks of the
step inside generate: XLA's cost analysis counts a loop body once, so `decode - prefill` is one
loop step plus what XLA hoists out of the loop (one-time parameter relayouts and casts): an upper
estimate; and the sum of XLA:TPU's per-instruction `estimated_cycles` of the loop body against
that of the step compiled alone. The batch is padded to a multiple of the data x expert shards
(as generate does: `rows`), and each step's tokens are routed as one block, padded to a multiple
of E tokens, with the eval capacity factor (`decoding.py`'s docstring).
"""
import argparse
import json
import math
import os
import sys
import time

import cases  # benchmarks/cases.py, beside this script (its folder is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ESTIMATE_NOTE = ("compiler estimate: XLA:TPU cost analysis of the compiled programs for the "
                 "slice's compile-only devices; nothing ran on a TPU")


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def _estimate(compiled, s) -> dict:
  """optimal_seconds (else the roofline), flops and bytes accessed per device."""
  from openmoe_jax.training import state_layout as layout
  c = layout.cost(compiled)
  flops, nbytes = c.get("flops", 0.0), c.get("bytes accessed", 0.0)
  roofline = max(flops / s.peak_flops_per_device, nbytes / s.hbm_bandwidth_per_device)
  optimal = c.get("optimal_seconds", -1.0)
  return {"seconds": optimal if optimal > 0 else roofline,
          "method": "xla optimal_seconds" if optimal > 0 else "roofline",
          "roofline_seconds": roofline, "flops": flops, "bytes_accessed": nbytes}


def _memory(compiled) -> dict:
  from openmoe_jax.training import state_layout as layout
  return {k.replace("_per_device", ""): v for k, v in layout.memory(compiled).items()}


def run_case(case: str, *, cache_len: int, prompt_len: int, temperature: float) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec
  from openmoe_jax import gin_utils
  from openmoe_jax.evaluation import decoding
  from openmoe_jax.planning import hlo_stats
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.planning import target
  from openmoe_jax.planning import tpu
  from openmoe_jax.planning import plan as tpu_plan
  from openmoe_jax.model.transformer import DecodeCache, Transformer
  gin_file, slice_name, batch, *rest = case.split()
  batch = int(batch)
  parts = {k: int(v) for k, v in (r.split("=") for r in rest if r.split("=")[0] in
                                  ("expert", "model"))}
  macros = [r for r in rest if r.split("=")[0] not in ("expert", "model")]
  s = tpu.parse_slice(slice_name)
  tpu.compile_host(s)
  devices = tpu.slice_devices(s)
  gin_utils.parse_gin([gin_file], macros, finalize=False)
  mesh = part.make_mesh(parts.get("expert", 1), parts.get("model", 1), devices=devices)
  part.check_experts_divisible(gin_utils.model_config().num_experts, mesh)
  cfg = tpu_plan._resolve_auto(gin_utils.model_config())  # pylint: disable=protected-access
  if prompt_len >= cache_len or decoding.bucket(prompt_len) != prompt_len or \
     decoding.bucket(cache_len - prompt_len) != cache_len - prompt_len:
    raise ValueError("--prompt_len and --cache_len - --prompt_len must be powers of two >= 8 "
                     "(decoding's buckets)")
  num_new = cache_len - prompt_len
  shards = mesh.shape["data"] * mesh.shape["expert"]
  rows = -(-batch // shards) * shards  # as decoding._batching pads the batch
  sampling = decoding.Sampling(temperature=temperature)
  replicated = NamedSharding(mesh, PartitionSpec())
  rules = part.axis_rules()
  with decoding._mesh_context(mesh), target.compiling_for("tpu"):  # pylint: disable=protected-access
    tokens = jax.ShapeDtypeStruct((1, max(cfg.num_experts, 1) * cfg.num_expert_replicas),
                                  jnp.int32)
    boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t),
                           tokens)["params"]
    params = _abstract(part.unbox(boxed), part.mesh_shardings(boxed, mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    stops, stop_valid = decoding._stop_arrays(())  # pylint: disable=protected-access
    out = {"case": case, "backend": "tpu", "accelerator_type": tpu.accelerator_type(s),
           "topology": s.topology, "device_kind": devices[0].device_kind,
           "num_devices": len(devices), "mesh": dict(mesh.shape), "batch": batch, "rows": rows,
           "cache_len": cache_len, "prompt_len": prompt_len, "sampling": (
               "greedy" if temperature == 0 else f"temperature {temperature}"),
           "activation_dtype": cfg.activation_dtype, "param_dtype": cfg.param_dtype,
           "dispatch": cfg.dispatch, "num_params": sum(math.prod(a.shape)
                                                       for a in jax.tree.leaves(params)),
           "hbm_bytes_per_device": s.hbm_bytes_per_device}
    programs = {}
    t = time.perf_counter()
    # 1. The program generate runs: prefill + while loop of steps.
    fn = decoding._compiled(cfg, sampling, num_new, decoding.EOS_ID, mesh)  # pylint: disable=protected-access
    programs["decode"] = fn.lower(
        params, arg((rows, prompt_len), jnp.int32), arg((rows,), jnp.int32), key,
        arg((), jnp.int32), arg(stops.shape, jnp.int32), arg(stop_valid.shape, bool)).compile()
    # 2. The prefill alone.
    prefill = jax.jit(lambda p, toks, st: decoding.prefill(p, cfg, toks, st, num_new))
    programs["prefill"] = prefill.lower(params, arg((rows, prompt_len), jnp.int32),
                                        arg((rows,), jnp.int32)).compile()
    # 3. One step alone, with a full cache of cache_len columns.
    kv = nn.logical_to_mesh_sharding(PartitionSpec(part.BATCH, part.LENGTH, part.HEADS, part.KV),
                                     mesh, rules)
    layer = jax.ShapeDtypeStruct((rows, cache_len, cfg.num_heads, cfg.head_dim), cfg.dtype,
                                 sharding=kv)
    cache = DecodeCache(keys=(layer,) * cfg.num_layers, values=(layer,) * cfg.num_layers,
                        index=arg((), jnp.int32), start=arg((rows,), jnp.int32))

    def step(params, cache, last, rng):
      tok = decoding.sample(last, rng, sampling)
      logits, _, cache = Transformer(cfg).apply({"params": params}, tok[:, None], cache=cache)
      return logits[:, 0], cache
    programs["step"] = jax.jit(step, donate_argnums=(1,)).lower(
        params, cache, arg((rows, cfg.vocab_size), jnp.float32), key).compile()
    out["compile_seconds"] = round(time.perf_counter() - t, 1)
  est = {name: _estimate(p, s) for name, p in programs.items()}
  cycles = {name: hlo_stats.estimated_cycles(p.as_text()) for name, p in programs.items()
            if name != "prefill"}
  loop_step = {k: est["decode"][k] - est["prefill"][k]
               for k in ("seconds", "roofline_seconds", "flops", "bytes_accessed")}
  out.update({
      "estimate_note": ESTIMATE_NOTE,
      "estimate_method": est["step"]["method"],
      "estimated_step_seconds": est["step"]["seconds"],
      "estimated_tokens_per_second": batch / est["step"]["seconds"],
      "step_roofline_seconds": est["step"]["roofline_seconds"],
      "step_flops_per_device": est["step"]["flops"],
      "step_bytes_accessed_per_device": est["step"]["bytes_accessed"],
      "estimated_prefill_seconds": est["prefill"]["seconds"],
      "estimated_prefill_tokens_per_second": batch * prompt_len / est["prefill"]["seconds"],
      # decode - prefill: one loop step plus the work XLA hoists out of the loop (one-time
      # parameter relayouts and casts), so an upper estimate of a step inside generate.
      "decode_minus_prefill_seconds": loop_step["seconds"],
      "decode_minus_prefill_tokens_per_second": batch / loop_step["seconds"],
      "decode_minus_prefill_flops_per_device": loop_step["flops"],
      "decode_minus_prefill_bytes_accessed_per_device": loop_step["bytes_accessed"],
      "memory": {name: _memory(p) for name, p in programs.items()},
      # XLA:TPU's per-instruction cycle estimates: the generate loop's body against the step
      # compiled alone (> 1: the step costs more inside the loop than alone).
      "hlo_cycles": {"standalone_step": cycles["step"]["total"],
                     "decode_loop_body": cycles["decode"]["loop_body"],
                     "decode_total": cycles["decode"]["total"]},
      "loop_body_vs_standalone_step": (cycles["decode"]["loop_body"] / cycles["step"]["total"]
                                       if cycles["step"]["total"] else None),
  })
  out["fits"] = out["memory"]["decode"]["peak_bytes"] <= s.hbm_bytes_per_device
  return out


def table(path: str) -> str:
  """The JSON lines of `path` as the markdown table of benchmarks/RESULTS.md."""
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = ["| case | devices (data, expert, model) | batch (rows) | est. step ms | est. tokens/s "
           "| step GB accessed / device | decode - prefill ms (tokens/s) | loop body / step cycles "
           "| est. prefill ms (P) | decode args / temp / peak GiB | compile s |",
           "|" + "---|" * 11]
  for line in open(path):
    r = json.loads(line)
    if "error" in r:
      lines.append(f"| {r['case']} | error: {r['error'][:100]} |" + " |" * 9)
      continue
    m, mem = r["mesh"], r["memory"]["decode"]
    rf = " (r)" if r["estimate_method"] == "roofline" else ""
    lines.append(
        f"| {r['case']} | {r['num_devices']} ({m['data']}, {m['expert']}, {m['model']}) "
        f"| {r['batch']} ({r['rows']}) | {1e3 * r['estimated_step_seconds']:.3f}{rf} "
        f"| {r['estimated_tokens_per_second']:,.0f} "
        f"| {r['step_bytes_accessed_per_device'] / 1e9:.3f} "
        f"| {1e3 * r['decode_minus_prefill_seconds']:.3f} "
        f"({r['batch'] / r['decode_minus_prefill_seconds']:,.0f}) "
        f"| {r['loop_body_vs_standalone_step']:.2f} "
        f"| {1e3 * r['estimated_prefill_seconds']:.2f} ({r['prompt_len']}) "
        f"| {gib(mem['argument_bytes'])} / {gib(mem['temp_bytes'])} / {gib(mem['peak_bytes'])} "
        f"| {r['compile_seconds']} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", action="append", default=[],
                 help='"<model gin> <slice> <batch> [expert=E] [model=M] [MACRO=value ...]", '
                      "repeatable")
  p.add_argument("--cache_len", type=int, default=2048, help="KV cache columns (P + N)")
  p.add_argument("--prompt_len", type=int, default=1024, help="prompt bucket P of the prefill")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  p.add_argument("--table", help="print the JSON lines of this file as a markdown table")
  p.add_argument("--out", help="also append each JSON line to this file")
  args = p.parse_args(argv)
  if args.table:
    print(table(args.table))
  cases.run_cases(args.case, lambda case: run_case(
      case, cache_len=args.cache_len, prompt_len=args.prompt_len,
      temperature=args.temperature), args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
