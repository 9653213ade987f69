"""One MoE layer vs a dense FFN of the same per-token compute, forward+backward (issues 2, 8).

Times jit(value_and_grad(sum(y * cotangent))) with respect to params and input for
`moe.MoeLayer` in each mode and for `layers.MlpBlock` with hidden = k * expert_mlp_dim, on the
default backend, and prints one JSON object. Modes (--dispatch, comma-separated):
  gather, einsum                   capacity routing (cf --capacity-factor), the two dispatches;
  dropless, dropless:blocked, dropless:ragged_dot
                                   dropless (sort by expert, grouped FFN; bare = 'auto');
  adaptive, adaptive:IMPL          adaptive capacity (E*C slots shared by load).

Useful FLOPs, times 3 for forward+backward: for the MoE layer the router (2*T*D*E) and the expert
matmuls of the assignments actually kept ((1 - dropped_fraction) * T * k * 8*D*F, three
projections with wi_0 twice as wide); for the dense FFN its matmuls (T * 8*D*(k*F)). Dispatch and
combine work is never counted. A large plain matmul, timed in the same run, gives the reference
peak.

Grouping: `MoeLayer` makes the group count a multiple of E (flaxformer's rule, needed when groups
are sharded over the expert axis), so 8192 tokens at E=32 become 32 groups of 256 tokens. The
issue's proportions are 4096-token groups; with --exact-groups (default) the benchmark swaps in
groups of exactly --group-size tokens (single device, no expert sharding, so the rule has no use
here); --no-exact-groups keeps the layer's own rule.

  .venv/bin/python benchmarks/moe_layer.py --experts 8,32,64 --tokens 8192 --repeats 5

Fine-grained experts (--fine-grained): many narrow experts with top-k 8 (OLMoE 64 / 8, Qwen3
128 / 8, DeepSeek-V3 256 / 8) at the same active FLOPs, side by side in one run. The rows:
  * dense      `layers.MlpBlock` with hidden H = --top-k x --expert-dim;
  * reference  top-(--top-k) over --ref-experts experts of width F = --expert-dim;
  * fine       top-(--fine-top-k) over each of --fine-experts, experts of width
               F_fine = --top-k x --expert-dim / --fine-top-k (exactly: it must divide).
The rule is fine_top_k x F_fine = top_k x F = H, so every token's expert matmuls cost the same
8 x D x H FLOPs (forward) in every row, dense included ("active_flops_per_token"); only the
router's 2 x D x E ("router_flops_per_token") grows with E. Defaults: D 512, F 1024 (F_fine 256),
16 reference experts (64 x 256 = 16 x 1024 expert units: the E=64 row splits each reference
expert into 4), modes --dispatch dropless. JSON: "case_set": "fine_grained", "active_rule",
"dense" (the dense FFN's timing keys and "hidden", "active_flops_per_token"), and "configs", one
per row: "name" (top8_e64, ...), "experts", "top_k", "expert_mlp_dim",
"active_flops_per_token", "router_flops_per_token", "expert_params", and per mode the timing
keys of the per-E table ("seconds", "useful_flops", "flops_per_s", "us_per_token",
"dropped_fraction", ...) plus "ratio_to_dense" (useful FLOP/s against the dense FFN's) and
"seconds_ratio_to_dense" (step time against the dense FFN's).

  .venv/bin/python benchmarks/moe_layer.py --fine-grained --tokens 8192 --repeats 3

XLA:TPU compiler estimate (--tpu SLICE, e.g. v5p-8 = 4 chips, 2x2x1): instead of timing on the
default backend, the same rows (the --fine-grained set, else top-k over each of --experts) are
compiled forward+backward for the slice's compile-only devices with libtpu
(`openmoe_jax/planning/tpu.py`), under the (data, expert, model) mesh with --expert-partitions
expert shards (default: all devices) and the training axis rules (batch over data x expert,
experts over expert); 'auto' choices as on TPU (dropless: ragged_dot). --tokens counts the whole
slice's tokens. The time is XLA's `optimal_seconds`, else the roofline of its flops and bytes
accessed (`benchmarks/decode_tpu.py`'s `_estimate`, as `planning/plan.py`), memory from the
compiled program (`state_layout.memory`). Only the dropless modes (every assignment counted as
useful; an --ep-buffer-factor overflow would be a drop, not visible at compile time). Per mode:
"estimated_seconds", "estimate_method", "roofline_seconds", "xla_flops_per_device",
"xla_bytes_accessed_per_device", "useful_flops_per_device", "estimated_flops_per_s_per_device",
"estimated_mfu" (against the bf16 peak), the memory keys, "fits", "collectives",
"compile_seconds", "ratio_to_dense" and "seconds_ratio_to_dense". Nothing runs on a TPU:
every time printed is a **compiler estimate**.

  .venv/bin/python benchmarks/moe_layer.py --fine-grained --tpu v5p-8 --tokens 32768 \
      --d-model 2048 --expert-dim 4096 --dtype bfloat16
"""
import argparse
import contextlib
import json
import statistics
import time

import jax
import jax.numpy as jnp

from openmoe_jax.model import layers
from openmoe_jax.model import moe
from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig


def _median_seconds(fn, args, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@contextlib.contextmanager
def _exact_groups(enabled: bool):
  """Groups of exactly group_size tokens instead of a group count that is a multiple of E."""
  original = routing.num_groups
  if enabled:
    routing.num_groups = lambda num_tokens, group_size, *_: max(num_tokens // group_size, 1)
  try:
    yield
  finally:
    routing.num_groups = original


def _fwd_bwd(apply):
  """jit of (params, x, ct) -> value and grads of sum(apply(params, x) * ct) wrt params and x."""
  def loss(params, x, ct):
    return jnp.sum(apply(params, x) * ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def peak_flops(n: int, repeats: int, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  return 2 * n**3 / _median_seconds(jax.jit(jnp.matmul), (a, b), repeats)


def bench_dense(cfg: ModelConfig, x, ct, repeats: int) -> dict:
  hidden = cfg.num_selected_experts * cfg.expert_mlp_dim
  block = layers.MlpBlock(cfg, hidden)
  init = lambda xx: block.init(jax.random.PRNGKey(1), xx, deterministic=False)["params"]
  params = jax.jit(init)(x)  # compiled, not op by op
  step = _fwd_bwd(lambda prm, xx: block.apply({"params": prm}, xx, deterministic=False))
  seconds = _median_seconds(step, (params, x, ct), repeats)
  tokens = x.shape[0] * x.shape[1]
  flops = 3 * tokens * 8 * cfg.emb_dim * hidden
  return {"seconds": seconds, "useful_flops": flops, "flops_per_s": flops / seconds,
          "us_per_token": 1e6 * seconds / tokens}


def mode_config(base: ModelConfig, mode: str) -> ModelConfig:
  """A --dispatch entry -> the layer's configuration."""
  name, _, impl = mode.partition(":")
  if name in ("gather", "einsum"):
    return base.replace(dispatch=name)
  if name in ("dropless", "adaptive"):
    return base.replace(capacity_mode=name, grouped_matmul=impl or "auto")
  raise ValueError(f"unknown mode {mode!r}")


def bench_moe(cfg: ModelConfig, x, ct, repeats: int) -> dict:
  layer = moe.MoeLayer(cfg)
  mask = jnp.ones(x.shape[:2], bool)
  apply = lambda prm, xx: layer.apply({"params": prm}, xx, mask, deterministic=False)

  def init(xx):  # one compiled program (not op by op): the parameters and their routing metrics
    prm = layer.init(jax.random.PRNGKey(2), xx, mask, deterministic=False)["params"]
    return prm, apply(prm, xx)[1]
  params, metrics = jax.jit(init)(x)
  step = _fwd_bwd(lambda prm, xx: apply(prm, xx)[0])
  seconds = _median_seconds(step, (params, x, ct), repeats)
  tokens = x.shape[0] * x.shape[1]
  d, f, e, k = cfg.emb_dim, cfg.expert_mlp_dim, cfg.num_experts, cfg.num_selected_experts
  dropped = float(metrics.dropped_fraction)
  kept = (1.0 - dropped) * tokens * k
  flops = 3 * (2 * tokens * d * e + kept * 8 * d * f)
  n_groups = routing.num_groups(tokens, cfg.group_size, e, cfg.num_expert_replicas)
  capacity = routing.expert_capacity(
      tokens // n_groups, e, cfg.train_capacity_factor, num_selected_experts=k,
      min_capacity=cfg.min_expert_capacity, formula=cfg.capacity_formula)
  return {"seconds": seconds, "useful_flops": flops, "flops_per_s": flops / seconds,
          "us_per_token": 1e6 * seconds / tokens, "dropped_fraction": dropped,
          "groups": n_groups, "group_tokens": tokens // n_groups,
          "capacity": None if cfg.capacity_mode == "dropless" else capacity}


def _ints(text: str) -> list:
  return [int(v) for v in text.split(",") if v]


def fine_grained_rows(args) -> list:
  """(name, experts, top_k, expert_mlp_dim) of the --fine-grained rows: the reference top-k
  layer (none with --ref-experts 0), then top-(fine_top_k) over each of --fine-experts with
  experts fine_top_k times narrower than the reference's times top_k (same active width)."""
  active = args.top_k * args.expert_dim
  if active % args.fine_top_k:
    raise ValueError(f"--top-k x --expert-dim = {active} is not a multiple of --fine-top-k "
                     f"{args.fine_top_k}: no fine expert width gives the same active FLOPs")
  fine = active // args.fine_top_k
  rows = [] if not args.ref_experts else [
      (f"top{args.top_k}_e{args.ref_experts}", args.ref_experts, args.top_k, args.expert_dim)]
  return rows + [(f"top{args.fine_top_k}_e{e}", e, args.fine_top_k, fine)
                 for e in _ints(args.fine_experts)]


def case_config(args, experts: int, top_k: int, width: int) -> ModelConfig:
  return ModelConfig(emb_dim=args.d_model, expert_mlp_dim=width, num_experts=experts,
                     num_selected_experts=top_k, train_capacity_factor=args.capacity_factor,
                     group_size=args.group_size, activation_dtype=args.dtype,
                     ep_buffer_factor=args.ep_buffer_factor)


def row_info(name: str, cfg: ModelConfig) -> dict:
  """What a row is: its shape and its forward FLOPs per token (experts, router)."""
  d, e, k, f = cfg.emb_dim, cfg.num_experts, cfg.num_selected_experts, cfg.expert_mlp_dim
  return {"name": name, "experts": e, "top_k": k, "expert_mlp_dim": f,
          "active_flops_per_token": 8 * d * k * f, "router_flops_per_token": 2 * d * e,
          "expert_params": 4 * d * f * e}


def _versus_dense(entry: dict, dense: dict, rate_key: str, seconds_key: str) -> None:
  entry["ratio_to_dense"] = entry[rate_key] / dense[rate_key]
  entry["seconds_ratio_to_dense"] = entry[seconds_key] / dense[seconds_key]


def run_fine_grained(args, x, ct, modes, result) -> dict:
  """The --fine-grained rows timed on the default backend, one dense FFN for all."""
  hidden = args.top_k * args.expert_dim
  dense_cfg = case_config(args, max(args.ref_experts, args.top_k), args.top_k, args.expert_dim)
  result["dense"] = {"hidden": hidden, "active_flops_per_token": 8 * args.d_model * hidden,
                     **bench_dense(dense_cfg, x, ct, args.repeats)}
  for name, e, k, f in fine_grained_rows(args):
    cfg = case_config(args, e, k, f)
    entry = row_info(name, cfg)
    for mode in modes:
      with _exact_groups(args.exact_groups):
        entry[mode] = bench_moe(mode_config(cfg, mode), x, ct, args.repeats)
      _versus_dense(entry[mode], result["dense"], "flops_per_s", "seconds")
    result["configs"].append(entry)
  return result


def tpu_estimates(args, rows, modes, shape, result) -> dict:
  """XLA:TPU compiler estimates of the rows' forward+backward on the --tpu slice (see the module
  docstring); nothing runs. rows: (name, experts, top_k, width); the dense FFN comes first."""
  import flax.linen as nn
  from decode_tpu import _abstract, _estimate  # benchmarks/decode_tpu.py, beside this script
  from openmoe_jax.model import partitioning as part
  from openmoe_jax.planning import hlo_stats
  from openmoe_jax.planning import plan as tpu_plan
  from openmoe_jax.planning import target
  from openmoe_jax.planning import tpu
  from openmoe_jax.training import state_layout as layout
  s = tpu.parse_slice(args.tpu)
  added = tpu.compile_host(s)
  try:
    devices = tpu.slice_devices(s)
    n = len(devices)
    mesh = part.make_mesh(args.expert_partitions or n, 1, devices=devices)
    rules = part.LOGICAL_AXIS_RULES
    tokens = shape[0] * shape[1]
    result.update({
        "backend": "tpu (compile only)", "accelerator_type": tpu.accelerator_type(s),
        "topology": s.topology, "device_kind": devices[0].device_kind, "num_devices": n,
        "mesh": dict(mesh.shape), "tokens_per_device": tokens // n,
        "hbm_bytes_per_device": s.hbm_bytes_per_device,
        "peak_bf16_flops_per_device": s.peak_flops_per_device,
        "ep_buffer_factor": args.ep_buffer_factor, "estimate_note": tpu_plan.ESTIMATE_NOTE})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), target.compiling_for("tpu"):
      x = jax.ShapeDtypeStruct(shape, jnp.dtype(args.dtype),
                               sharding=part.batch_sharding(mesh, 3, rules))

      def estimate(module, call, useful_flops):
        boxed = jax.eval_shape(lambda xx: module.init(jax.random.key(0), *call(xx),
                                                      deterministic=False), x)["params"]
        params = _abstract(part.unbox(boxed), part.mesh_shardings(boxed, mesh, rules))
        first = lambda out: out[0] if isinstance(out, tuple) else out
        step = _fwd_bwd(lambda prm, xx: first(module.apply({"params": prm}, *call(xx),
                                                            deterministic=False)))
        t = time.perf_counter()
        compiled = step.lower(params, x, x).compile()
        seconds = time.perf_counter() - t
        est, mem = _estimate(compiled, s), layout.memory(compiled)
        useful = useful_flops / n
        return {"estimate_method": est["method"], "estimated_seconds": est["seconds"],
                "roofline_seconds": est["roofline_seconds"],
                "xla_flops_per_device": est["flops"],
                "xla_bytes_accessed_per_device": est["bytes_accessed"],
                "useful_flops_per_device": useful,
                "estimated_flops_per_s_per_device": useful / est["seconds"],
                "estimated_mfu": useful / (est["seconds"] * s.peak_flops_per_device),
                **mem, "fits": mem["peak_bytes_per_device"] <= s.hbm_bytes_per_device,
                "collectives": {k: v for k, v in hlo_stats.collectives(compiled.as_text()).items()
                                if v["count"]},
                "compile_seconds": round(seconds, 1)}

      hidden = args.top_k * args.expert_dim
      dense_cfg = case_config(args, max(args.ref_experts, args.top_k), args.top_k, args.expert_dim)
      result["dense"] = {"hidden": hidden, "active_flops_per_token": 8 * args.d_model * hidden,
                         **estimate(layers.MlpBlock(dense_cfg, hidden), lambda xx: (xx,),
                                    3 * tokens * 8 * args.d_model * hidden)}
      for name, e, k, f in rows:
        entry = row_info(name, case_config(args, e, k, f))
        for mode in modes:
          # 'auto' as a TPU run resolves it (ragged_dot), as the training-step plans do
          cfg = tpu_plan._resolve_auto(  # pylint: disable=protected-access
              mode_config(case_config(args, e, k, f), mode))
          layer = moe.MoeLayer(cfg)
          useful = 3 * tokens * (2 * args.d_model * e + k * 8 * args.d_model * f)
          entry[mode] = {"grouped_matmul": cfg.grouped_matmul,
                         "groups": routing.group_layout(cfg, *shape[:2])[2],
                         **estimate(layer, lambda xx: (xx, jnp.ones(xx.shape[:2], bool)), useful)}
          _versus_dense(entry[mode], result["dense"], "estimated_flops_per_s_per_device",
                        "estimated_seconds")
        result["configs"].append(entry)
  finally:
    tpu.restore_environment(added)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", default="8,32,64", help="comma-separated expert counts")
  parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
  parser.add_argument("--seq-len", type=int, default=4096, help="tokens per batch row")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps (median) after warmup")
  parser.add_argument("--dispatch", default=None,
                      help="comma-separated MoE modes (see the module docstring; default "
                           "gather,einsum,dropless, with --fine-grained or --tpu dropless)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="activation dtype (parameters stay float32)")
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--expert-dim", type=int, default=1024)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--group-size", type=int, default=4096, help="maximum routing group size")
  parser.add_argument("--exact-groups", action=argparse.BooleanOptionalAction, default=True,
                      help="groups of exactly --group-size tokens (see the module docstring)")
  parser.add_argument("--peak-n", type=int, default=2048, help="side of the reference matmul")
  fine = parser.add_argument_group("fine-grained experts (see the module docstring)")
  fine.add_argument("--fine-grained", action="store_true",
                    help="the fine-grained case set: dense, reference top-k, top-8 at E=64/128/256")
  fine.add_argument("--fine-experts", default="64,128,256",
                    help="comma-separated expert counts of the fine-grained rows")
  fine.add_argument("--fine-top-k", type=int, default=8, help="top-k of the fine-grained rows")
  fine.add_argument("--ref-experts", type=int, default=16,
                    help="experts of the reference top-k row (0: no reference row)")
  tpu_args = parser.add_argument_group("XLA:TPU compiler estimate (libtpu; nothing runs)")
  tpu_args.add_argument("--tpu", help="compile for this slice instead of timing (e.g. v5p-8)")
  tpu_args.add_argument("--expert-partitions", type=int, default=0,
                        help="expert axis of the --tpu mesh (0: all devices)")
  tpu_args.add_argument("--ep-buffer-factor", type=float, default=2.0,
                        help="ModelConfig.ep_buffer_factor on the --tpu mesh (as the TPU plans "
                             "in RESULTS.md; 0: worst-case buffers)")
  args = parser.parse_args(argv)
  if not args.tpu:  # libtpu installed and no TPU here: the CPU, without libtpu's start-up noise
    from openmoe_jax.planning import tpu
    tpu.quiet_cpu_default()

  seq_len = min(args.seq_len, args.tokens)
  if args.tokens % seq_len:
    parser.error(f"--tokens {args.tokens} must be a multiple of --seq-len {seq_len}")
  if args.exact_groups and args.tokens % args.group_size and not args.tpu:
    parser.error(f"--tokens {args.tokens} must be a multiple of --group-size {args.group_size}")
  shape = (args.tokens // seq_len, seq_len, args.d_model)
  dtype = jnp.dtype(args.dtype)
  modes = (args.dispatch or ("dropless" if args.fine_grained or args.tpu else
                             "gather,einsum,dropless")).split(",")
  if args.tpu and any(mode.partition(":")[0] != "dropless" for mode in modes):
    parser.error(f"--tpu estimates the dropless modes only, not {','.join(modes)}")
  if args.fine_grained or args.tpu:
    try:
      rows = (fine_grained_rows(args) if args.fine_grained else
              [(f"top{args.top_k}_e{e}", e, args.top_k, args.expert_dim)
               for e in _ints(args.experts)])
    except ValueError as e:
      parser.error(str(e))
    result = {"case_set": "fine_grained" if args.fine_grained else "experts",
              "dtype": args.dtype, "tokens": args.tokens, "d_model": args.d_model,
              "expert_mlp_dim": args.expert_dim, "top_k": args.top_k,
              "fine_top_k": args.fine_top_k if args.fine_grained else None,
              "active_rule": "top_k x expert_mlp_dim equal in every row (dense hidden = "
                             f"{args.top_k} x {args.expert_dim}): same expert FLOPs per token",
              "capacity_factor": args.capacity_factor, "group_size": args.group_size,
              "configs": []}
    if args.tpu:
      result["exact_groups"] = False  # the layer's own rule: groups are sharded over experts
      from openmoe_jax.errors import UsageError
      try:
        result = tpu_estimates(args, rows, modes, shape, result)
      except UsageError as e:  # an unknown slice, no libtpu: one line
        parser.error(str(e))
    else:
      x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
      ct = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
      result.update({"backend": jax.default_backend(), "devices": str(jax.devices()),
                     "exact_groups": args.exact_groups,
                     "peak_matmul_flops_per_s": peak_flops(args.peak_n, args.repeats, dtype)})
      result = run_fine_grained(args, x, ct, modes, result)
    print(json.dumps(result, indent=1))
    return result
  x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
  ct = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  result = {"backend": jax.default_backend(), "devices": str(jax.devices()), "dtype": args.dtype,
            "tokens": args.tokens, "d_model": args.d_model, "expert_mlp_dim": args.expert_dim,
            "top_k": args.top_k, "capacity_factor": args.capacity_factor,
            "group_size": args.group_size, "exact_groups": args.exact_groups,
            "peak_matmul_flops_per_s": peak_flops(args.peak_n, args.repeats, dtype), "configs": []}
  for e in (int(v) for v in args.experts.split(",")):
    base = ModelConfig(emb_dim=args.d_model, expert_mlp_dim=args.expert_dim, num_experts=e,
                       num_selected_experts=args.top_k, train_capacity_factor=args.capacity_factor,
                       group_size=args.group_size, activation_dtype=args.dtype)
    entry = {"experts": e, "dense": bench_dense(base, x, ct, args.repeats)}
    for mode in modes:
      with _exact_groups(args.exact_groups):
        entry[mode] = bench_moe(mode_config(base, mode), x, ct, args.repeats)
      entry[mode]["ratio_to_dense"] = entry[mode]["flops_per_s"] / entry["dense"]["flops_per_s"]
    result["configs"].append(entry)
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
