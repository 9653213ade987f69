"""Ragged dispatch: assignments sorted by expert -> grouped expert FFN -> unsorted and combined.

Used by the 'dropless' and 'adaptive' capacity modes, where experts take variable numbers of
tokens. Every row movement is a gather whose gradient is the inverse gather (`take_rows`), so no
scatter-add appears in forward or backward passes.

Expert parallelism (`expert` mesh axis > 1) runs under `shard_map`: each device routes its own
tokens, packs the rows for every expert shard into a fixed chunk of `S` rows, exchanges chunks
with one all-to-all, sorts what it received by local expert, runs the grouped FFN, and sends the
results back the same way. The chunk is static: by default the worst case (all of a device's
assignments to one shard, so nothing can overflow); with `ep_buffer_factor` f > 0 it is
f x the balanced share, and any assignment that does not fit is dropped *and reported* (it
counts in `dropped_fraction`). This is the 'dense' exchange (`EXPERT_EXCHANGE`).

The 'ragged' exchange (`jax.lax.ragged_all_to_all`, as MaxText's `moe.py` uses on TPU) sends
each device's sorted assignments as they are: only the rows that exist travel, into one receive
buffer pooled over all sources. Sizes and offsets are agreed first by two small all-to-alls of
counts (no all-gather). The send buffer is the A sorted rows, whatever the expert-parallel size;
the receive buffer is the worst case a shard can get (ep x N x min(K, local experts) rows) with
`ep_buffer_factor` 0, so nothing can drop, or ceil(f x A) rows (f x the balanced share) with
f > 0, where rows past it are dropped and reported as above (a receiver overflows only when its
total load does, not when one sender's share does). XLA:CPU has no ragged all-to-all: 'auto'
takes 'dense' there, runs refuse a forced 'ragged' (`check_exchange`), and the layer itself
runs the same algorithm on CPU over `emulated_ragged_all_to_all` (an all_to_all of padded
slices with the collective's documented semantics) so the tests check it against the
single-device layer.

Legend: N tokens on this device, K experts per token, A = N*K assignments, D embed, E experts,
ep expert shards, S chunk rows per (source, destination) pair.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from openmoe_jax.model import grouped
from openmoe_jax.model import partitioning as part
from openmoe_jax.planning import target

RAGGED_PLATFORMS = ("tpu", "gpu")  # backends whose XLA lowers ragged-all-to-all


@jax.custom_vjp
def take_rows(x, idx, inv):
  """y[i] = x[idx[i]] (idx == len(x) reads a zero row).

  inv[j, :] lists every i with idx[i] == j (len(y) where fewer), so the gradient is the gather
  dx[j] = sum_m dy[inv[j, m]] instead of a scatter-add.
  """
  return _take(x, idx)


def _take(x, idx):
  return jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)[idx]


def _take_fwd(x, idx, inv):
  return _take(x, idx), (x[:0], idx, inv)  # x[:0]: x's type (shard_map varying axes), no data


def _take_bwd(res, dy):
  x_like, idx, inv = res
  return grouped.sum_to(jnp.sum(_take(dy, inv), axis=1), x_like), None, None


take_rows.defvjp(_take_fwd, _take_bwd)


def _inverse(perm):
  """Inverse of a permutation (integer scatter, not differentiated)."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def sort_by_key(key, num_keys: int):
  """Stable sort of rows by an int key in [0, num_keys] (num_keys = 'not sent').

  Returns (order, rank, counts): order[i] the row at sorted place i, rank[r] the sorted place of
  row r, counts[k] rows with key k (k < num_keys).
  """
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jnp.bincount(key, length=num_keys + 1)[:num_keys].astype(jnp.int32)
  return order, _inverse(order), counts


def _dropout_keep(rng, shape, rate: float, dtype):
  if rng is None or rate == 0.0:
    return None
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  return keep.astype(dtype) / (1.0 - rate)


def local_ffn(tokens, expert_index, kept, kernels, *, impl: str, dropout=(None, 0.0)):
  """Dropless on one device: tokens [N, D], expert_index/kept [N, K] -> per-assignment outputs.

  Returns [N, K, D], zero where not kept.
  """
  n, k = expert_index.shape
  wi_0, wi_1, wo = kernels
  num_experts = wi_0.shape[0]
  a = n * k
  key = jnp.where(kept, expert_index, num_experts).reshape(a)
  order, rank, sizes = sort_by_key(key, num_experts)
  sent = key[order] < num_experts
  token_of_row = jnp.where(sent, order // k, n)
  row_of_assignment = jnp.where(key < num_experts, rank, a)
  rows = take_rows(tokens, token_of_row, row_of_assignment.reshape(n, k))
  keep = _dropout_keep(dropout[0], (a, wi_1.shape[-1]), dropout[1], rows.dtype)
  out = grouped.expert_ffn(rows, sizes, wi_0, wi_1, wo, keep=keep, impl=impl)
  assignment_of_row = jnp.where(sent, order, a)
  return take_rows(out, row_of_assignment, assignment_of_row[:, None]).reshape(n, k, -1)


def chunk_rows(num_assignments: int, num_shards: int, buffer_factor: float) -> int:
  """Rows each device reserves per destination shard (static)."""
  if buffer_factor <= 0:
    return num_assignments
  return min(num_assignments, max(8, math.ceil(buffer_factor * num_assignments / num_shards)))


def _exchange_ffn(tokens, expert_index, kept, kernels, rng, *, ep_axis, model_axis, num_experts,
                  buffer_factor, impl, rate):
  """Per-device body under shard_map: returns ([N, K, D] outputs, kept after any overflow)."""
  n, k = expert_index.shape
  ep = jax.lax.axis_size(ep_axis)
  wi_0, wi_1, wo = kernels
  local_experts = num_experts // ep
  a = n * k
  s = chunk_rows(a, ep, buffer_factor)
  # Sort by expert, which also orders by destination shard; rank within the shard's chunk.
  key = jnp.where(kept, expert_index, num_experts).reshape(a)
  order, rank, _ = sort_by_key(key, num_experts)
  dest = key // local_experts                       # ep = not sent
  dest_counts = jnp.bincount(dest, length=ep + 1)[:ep]
  dest_start = jnp.cumsum(dest_counts) - dest_counts
  place = rank - dest_start[jnp.minimum(dest, ep - 1)]
  fits = (dest < ep) & (place < s)
  slot_of_assignment = jnp.where(fits, dest * s + place, ep * s).astype(jnp.int32)
  assignment_of_slot = jnp.full((ep * s + 1,), a, jnp.int32).at[slot_of_assignment].set(
      jnp.arange(a, dtype=jnp.int32))[:ep * s]
  filled = assignment_of_slot < a
  token_of_slot = jnp.where(filled, assignment_of_slot // k, n)
  send = take_rows(tokens, token_of_slot, slot_of_assignment.reshape(n, k))
  send_expert = jnp.where(filled, key[jnp.minimum(assignment_of_slot, a - 1)] % local_experts,
                          local_experts)
  exchange = lambda x: jax.lax.all_to_all(x, ep_axis, 0, 0, tiled=True)
  recv = exchange(send)                                # [ep*S, D], chunk i from shard i
  recv_expert = exchange(send_expert)
  order2, rank2, sizes2 = sort_by_key(recv_expert, local_experts)
  rows = take_rows(recv, order2, rank2[:, None])
  keep = _dropout_keep(rng, (ep * s, wi_1.shape[-1]), rate, rows.dtype)
  out = grouped.expert_ffn(rows, sizes2, wi_0, wi_1, wo, keep=keep, impl=impl)
  if model_axis is not None:
    out = jax.lax.psum(out, model_axis)               # wo contracted a model-sharded hidden dim
  back = exchange(take_rows(out, rank2, order2[:, None]))
  picked = take_rows(back, slot_of_assignment, assignment_of_slot[:, None])
  return picked.reshape(n, k, -1), (fits.reshape(n, k) & kept)


def resolve_exchange(exchange: str, platform=None) -> str:
  """The exchange the layer runs: 'auto' is 'ragged' where the backend has a ragged
  all-to-all (TPU, GPU) and 'dense' elsewhere (XLA:CPU)."""
  if exchange != "auto":
    return exchange
  return "ragged" if (platform or target.platform()) in RAGGED_PLATFORMS else "dense"


def check_exchange(cfg) -> None:
  """A run's EXPERT_EXCHANGE against its backend (before anything is written): ValueError (one
  line) for a forced 'ragged' where XLA has no ragged all-to-all."""
  if cfg.expert_exchange == "ragged" and target.platform() not in RAGGED_PLATFORMS:
    raise ValueError(f"EXPERT_EXCHANGE='ragged' needs jax.lax.ragged_all_to_all, which XLA:"
                     f"{target.platform().upper()} does not have (TPU and GPU do): use 'auto' "
                     "or 'dense'")


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's semantics (one slice per peer) from a dense all_to_all of
  padded slices: for backends without the collective (XLA:CPU), where it checks the ragged
  algorithm; it moves ep x len(operand) rows, so it saves nothing."""
  ep = jax.lax.axis_size(axis_name)
  m, r = operand.shape[0], output.shape[0]
  tail = (1,) * (operand.ndim - 1)
  i = jnp.arange(m)
  src = jnp.clip(input_offsets[:, None] + i[None], 0, m - 1)            # [ep, m]
  valid = (i[None] < send_sizes[:, None]).reshape(ep, m, *tail)
  chunks = jnp.where(valid, operand[src], jnp.zeros((), operand.dtype))  # [ep, m, ...]
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)          # [ep(source), m, ...]
  start = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where source i writes
  p = jnp.arange(r)
  cover = (p[None] >= start[:, None]) & (p[None] < (start + recv_sizes)[:, None])  # [ep, r]
  source = jnp.argmax(cover, axis=0)
  row = jnp.clip(p - start[source], 0, m - 1)
  picked = got.reshape(ep * m, *operand.shape[1:])[source * m + row]
  return jnp.where(jnp.any(cover, axis=0).reshape(r, *tail), picked, output)


def _ragged_collective():
  if target.platform() in RAGGED_PLATFORMS:
    return jax.lax.ragged_all_to_all
  return emulated_ragged_all_to_all


def move_rows(collective, axis_name, rows: int, x, plan):
  """x's slices moved as plan = (input_offsets, send_sizes, output_offsets, recv_sizes) says,
  into a zero buffer of `rows` rows.

  The buffer is typed as varying over the mesh axes x varies over: a plain jnp.zeros is
  invariant, and ragged_all_to_all types its result as its output buffer, so the exchanged rows
  would read as replicated and every gradient through them would be all-reduced over the
  expert axis (XLA:TPU keeps those all-reduces: 21.4 against 12.9 GiB on the 8B step).
  """
  return collective(x, grouped.varying_like(jnp.zeros((rows,) + x.shape[1:], x.dtype), x),
                    *plan, axis_name=axis_name)


def receive_rows(n: int, k: int, local_experts: int, num_shards: int,
                 buffer_factor: float) -> int:
  """Rows of the ragged exchange's receive buffer (static): the most one shard can be sent
  (every source's N tokens with min(K, local experts) assignments each there) at factor 0,
  else ceil(f x N x K), f x the balanced share, capped by that worst case."""
  worst = num_shards * n * min(k, local_experts)
  if buffer_factor <= 0:
    return worst
  return min(worst, max(8, math.ceil(buffer_factor * n * k)))


def _ragged_exchange_ffn(tokens, expert_index, kept, kernels, rng, *, ep_axis, model_axis,
                         num_experts, buffer_factor, impl, rate):
  """Per-device body under shard_map, exchanging with ragged all-to-alls: returns ([N, K, D]
  outputs, kept after any receive-buffer overflow)."""
  n, k = expert_index.shape
  ep = jax.lax.axis_size(ep_axis)
  wi_0, wi_1, wo = kernels
  local = num_experts // ep
  a = n * k
  r = receive_rows(n, k, local, ep, buffer_factor)
  exchange = _ragged_collective()
  to_all = lambda x: jax.lax.all_to_all(x, ep_axis, 0, 0, tiled=True)
  # Sorted by expert = grouped by destination shard, by local expert within it.
  key = jnp.where(kept, expert_index, num_experts).reshape(a)
  order, rank, counts = sort_by_key(key, num_experts)
  counts = counts.reshape(ep, local)                     # [destination, local expert]
  dest_counts = jnp.sum(counts, axis=1)
  in_off = (jnp.cumsum(dest_counts) - dest_counts).astype(jnp.int32)
  # Receivers learn every source's per-expert counts (and where its rows start there), place
  # the sources one after another, accept what fits in r rows, and say so back.
  got = to_all(jnp.concatenate([counts, in_off[:, None]], axis=1))    # [source, local + 1]
  recv_counts, src_in_off = got[:, :local], got[:, local]
  from_src = jnp.sum(recv_counts, axis=1)
  col_start = (jnp.cumsum(from_src) - from_src).astype(jnp.int32)
  accepted = jnp.clip(r - col_start, 0, from_src).astype(jnp.int32)
  back = to_all(jnp.stack([col_start, accepted], axis=1))              # [destination, 2]
  out_off, send_sizes = back[:, 0], back[:, 1]
  # The sorted rows that go: within their destination's accepted prefix.
  dest = key // local                                                   # ep = not sent
  d = jnp.minimum(dest, ep - 1)
  fits = (dest < ep) & (rank - in_off[d] < send_sizes[d])
  fits_sorted = fits[order]
  token_of_row = jnp.where(fits_sorted, order // k, n)
  row_of_assignment = jnp.where(fits, rank, a)
  send = take_rows(tokens, token_of_row, row_of_assignment.reshape(n, k))  # [A, D]
  there = (in_off, send_sizes, out_off, accepted)      # by source: what goes where
  recv = move_rows(exchange, ep_axis, r, send, there)
  # Local expert of each received row, from the counts: blocks (source, expert) in order.
  block_len = recv_counts.reshape(ep * local)
  block_start = (col_start[:, None] + jnp.cumsum(recv_counts, axis=1) - recv_counts).reshape(-1)
  p = jnp.arange(r, dtype=jnp.int32)
  block = jnp.clip(jnp.searchsorted(block_start, p, side="right") - 1, 0, ep * local - 1)
  source = block // local
  valid = (p < block_start[block] + block_len[block]) & (p < col_start[source] + accepted[source])
  recv_expert = jnp.where(valid, block % local, local)
  order2, rank2, sizes2 = sort_by_key(recv_expert, local)
  rows = take_rows(recv, order2, rank2[:, None])
  keep = _dropout_keep(rng, (r, wi_1.shape[-1]), rate, rows.dtype)
  out = grouped.expert_ffn(rows, sizes2, wi_0, wi_1, wo, keep=keep, impl=impl)
  if model_axis is not None:
    out = jax.lax.psum(out, model_axis)               # wo contracted a model-sharded hidden dim
  out = take_rows(out, rank2, order2[:, None])        # back in receive-buffer order
  again = (col_start, accepted, src_in_off, send_sizes)  # the same slices, reversed
  home = move_rows(exchange, ep_axis, a, out, again)    # [A, D] sorted order
  assignment_of_row = jnp.where(fits_sorted, order, a)
  picked = take_rows(home, row_of_assignment, assignment_of_row[:, None])
  return picked.reshape(n, k, -1), (fits.reshape(n, k) & kept)


def _mesh_axis(logical: str):
  """Mesh axis (or tuple of axes, or None) a logical axis maps to under the rules in force."""
  return nn.logical_to_mesh_axes((logical,))[0]


def ragged_ffn(tokens, expert_index, kept, kernels, *, impl: str, buffer_factor: float,
               dropout=(None, 0.0), exchange: str = "auto"):
  """Dropless expert FFN of token groups [G, T, D] with routing [G, T, K].

  Without a mesh (or with experts unsharded) everything is local; otherwise the work runs under
  shard_map over the mesh, exchanging rows between expert shards by `exchange` ('dense',
  'ragged', or 'auto': `resolve_exchange`).

  Returns (outputs [G, T, K, D] zero where not kept, kept [G, T, K] after any buffer overflow).
  """
  g, t, d = tokens.shape
  k = expert_index.shape[-1]
  mesh = jax.sharding.get_abstract_mesh()
  rng, rate = dropout
  if mesh.empty:
    out = local_ffn(tokens.reshape(g * t, d), expert_index.reshape(g * t, k),
                    kept.reshape(g * t, k), kernels, impl=impl, dropout=dropout)
    return out.reshape(g, t, k, d), kept
  batch_axes = _mesh_axis(part.BATCH)
  ep_axis = _mesh_axis(part.EXPERT)
  model_axis = _mesh_axis(part.EXPERT_MLP)
  if model_axis is not None and mesh.shape[model_axis] == 1:
    model_axis = None
  batch_names = (() if batch_axes is None else
                 batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
  ep = part.logical_axis_size(part.EXPERT)
  if ep > 1 and ep_axis not in batch_names:
    raise ValueError(f"dropless expert parallelism needs the batch sharded over the expert axis "
                     f"{ep_axis!r} too (rules map batch to {batch_axes})")
  wi_0, wi_1, wo = kernels
  e, _, two_f = wi_0.shape
  # wi_0's output is split in halves a | b: keep both halves of a model shard's hidden units local.
  wi_0 = wi_0.reshape(e, d, 2, two_f // 2)

  def body(tok, idx, kp, w0, w1, w2, key=None):
    gl, tl, _ = tok.shape
    w0 = w0.reshape(w0.shape[0], d, -1)
    args = (tok.reshape(gl * tl, d), idx.reshape(gl * tl, k), kp.reshape(gl * tl, k), (w0, w1, w2))
    if key is not None:  # a different dropout mask on every device
      key = jax.random.fold_in(key, jax.lax.axis_index(tuple(mesh.axis_names)))
    if ep == 1:
      out, kept_now = local_ffn(*args, impl=impl, dropout=(key, rate)), args[2]
      if model_axis is not None:
        out = jax.lax.psum(out, model_axis)
    else:
      body_fn = _ragged_exchange_ffn if resolve_exchange(exchange) == "ragged" else _exchange_ffn
      out, kept_now = body_fn(*args, key, ep_axis=ep_axis, model_axis=model_axis,
                              num_experts=e, buffer_factor=buffer_factor, impl=impl, rate=rate)
    return out.reshape(gl, tl, k, d), kept_now.reshape(gl, tl, k)

  tok_spec = P(batch_axes, None, None)
  kernel_specs = (P(ep_axis, None, None, model_axis), P(ep_axis, None, model_axis),
                  P(ep_axis, model_axis, None))
  args = (tokens, expert_index, kept, wi_0, wi_1, wo) + (() if rng is None else (rng,))
  specs = (tok_spec, tok_spec, tok_spec, *kernel_specs) + (() if rng is None else (P(),))
  fn = jax.shard_map(body, in_specs=specs, out_specs=(P(batch_axes, None, None, None), tok_spec))
  return fn(*args)
