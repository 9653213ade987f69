"""Grouped expert FFN: rows sorted by expert, each expert's contiguous segment through its own FFN.

    y[r] = wo[e] . ((x[r] wi_0[e])[:F] * silu((x[r] wi_0[e])[F:]) * (x[r] wi_1[e]))   e = expert of r

Rows are sorted by expert and `group_sizes[e]` counts expert e's rows; rows past
sum(group_sizes) are padding and come back as zeros. Two implementations of the same function:

  * 'ragged_dot': three `jax.lax.ragged_dot` grouped matmuls (XLA's grouped GEMM; GPU);
  * 'pallas': the Pallas TPU grouped matmul (megablox gmm, `pallas_grouped.py`);
  * 'blocked': a loop over experts and, inside, over tiles of `block_rows` rows of the expert's
    segment, then over quarter-height tiles for the rest (the last one runs past the segment's
    end and is masked), one dense [b, D] x [D, F] matmul per projection and tile. Both loops have dynamic trip counts, so padding rows and
    worst-case buffers cost memory, not FLOPs; an expert's weights are read, and its weight
    gradients written, once per expert rather than once per tile. The backward pass is the same
    double loop (per-tile VJP, weight gradients accumulated in the inner loop's carry), so nothing
    is scattered. On XLA:CPU it is the faster of the two by far (benchmarks/RESULTS.md has the
    numbers).

Legend: N rows, D embed, F expert hidden, E experts, b block rows.
"""
import functools

import jax
import jax.numpy as jnp

from openmoe_jax.planning import target
from openmoe_jax.model.config import GROUPED_MATMULS
from openmoe_jax.model.layers import gated_activation


def resolve(impl: str) -> str:
  """'auto': blocked on CPU, ragged_dot on TPU and GPU (the Pallas kernel does not compile for
  v2/v3); benchmarks/RESULTS.md has the measurements and compiler estimates behind the choice."""
  if impl != "auto":
    return impl
  return "blocked" if target.platform() == "cpu" else "ragged_dot"


def block_rows_for(num_rows: int, num_experts: int) -> int:
  """Tile height: the largest power of two <= the average segment, in [16, 256].

  Large tiles run closest to the matmul peak; each segment's remainder goes through tiles a
  quarter as high (`tail_rows`), so the waste stays under b/4 rows per expert.
  """
  target = max(num_rows // max(num_experts, 1), 1)
  b = 16
  while b * 2 <= min(target, 256):
    b *= 2
  return b


def _tile_ffn(x, w0, w1, wo, keep):
  """One tile [b, D] through one expert's FFN; keep: dropout scale [b, F] or None."""
  h = gated_activation(x @ w0, x @ w1)
  if keep is not None:
    h = h * keep.astype(h.dtype)
  return h @ wo


def varying_like(init, *refs):
  """Under shard_map, marks `init` (a loop carry, a zero buffer a collective writes into) as
  varying over every mesh axis the arrays `refs` vary over."""
  axes = lambda a: jax.typeof(a).manual_axis_type.varying
  missing = tuple(sorted(frozenset().union(*(axes(r) for r in refs if r is not None))
                         - axes(init)))
  return jax.lax.pcast(init, missing, to="varying") if missing else init


def sum_to(ct, primal):
  """Under shard_map, sums a cotangent over the mesh axes it varies over but its primal doesn't
  (a weight shared by all data shards gets the sum of their gradients)."""
  axes = lambda a: jax.typeof(a).manual_axis_type.varying
  extra = tuple(sorted(axes(ct) - axes(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def _padded(x, b):
  return jnp.concatenate([x, jnp.zeros((b,) + x.shape[1:], x.dtype)], axis=0)


def tail_rows(b: int) -> int:
  """Height of the tiles that cover what is left of a segment after its full b-row tiles."""
  return max(b // 4, min(b, 8))  # never taller than b: the input is padded by b rows


def _segment_loop(start, size, b: int, tile, carry):
  """Runs `tile(height)(first_row, carry)` over one segment: full b-row tiles, then the rest in
  `tail_rows(b)`-row tiles, so at most tail_rows(b) - 1 rows per segment are wasted."""
  full = size // b
  carry = jax.lax.fori_loop(0, full, lambda j, c: tile(b)(start + j * b, c), carry)
  t = tail_rows(b)
  tail_start = start + full * b
  tails = (size - full * b + t - 1) // t
  return jax.lax.fori_loop(0, tails, lambda j, c: tile(t)(tail_start + j * t, c), carry)


def _segments(group_sizes):
  """First row and row count of every expert's segment."""
  return (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32), group_sizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked(x, group_sizes, w0, w1, wo, keep, b):
  return _blocked_fwd(x, group_sizes, w0, w1, wo, keep, b)[0]


def _blocked_fwd(x, group_sizes, w0, w1, wo, keep, b):
  n, d = x.shape
  starts, sizes = _segments(group_sizes)
  xp = _padded(x, b)
  kp = None if keep is None else _padded(keep, b)

  def expert_body(e, out):
    we = (w0[e], w1[e], wo[e])  # read once per expert, not once per tile
    end = starts[e] + sizes[e]

    def tile(size):
      def body(s, out):
        xt = jax.lax.dynamic_slice_in_dim(xp, s, size)
        kt = None if kp is None else jax.lax.dynamic_slice_in_dim(kp, s, size)
        yt = _tile_ffn(xt, *we, kt)
        # Rows past the segment belong to later experts (written by their own, later tiles) or
        # are padding: zero them so padding reads back as zeros.
        yt = jnp.where((s + jnp.arange(size) < end)[:, None], yt, 0).astype(out.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, yt, s, axis=0)
      return body

    return _segment_loop(starts[e], sizes[e], b, tile, out)

  init = varying_like(jnp.zeros((n + b, d), x.dtype), x, w0, w1, wo, keep, group_sizes)
  out = jax.lax.fori_loop(0, w0.shape[0], expert_body, init)
  return out[:n], (x, group_sizes, w0, w1, wo, keep)


def _blocked_bwd(b, res, dy):
  x, group_sizes, w0, w1, wo, keep = res
  n, _ = x.shape
  starts, sizes = _segments(group_sizes)
  xp, dyp = _padded(x, b), _padded(dy, b)
  kp = None if keep is None else _padded(keep, b)
  acc_dtype = lambda w: jnp.promote_types(w.dtype, jnp.float32)
  refs = (x, dy, w0, w1, wo, keep, group_sizes)

  def expert_body(e, carry):
    dx, dws = carry
    end = starts[e] + sizes[e]
    # All tile operands varying over the same mesh axes, so the VJP sums nothing across
    # devices; `sum_to` below does that once for the whole gradient.
    we = tuple(varying_like(w[e], *refs) for w in (w0, w1, wo))

    def tile(size):
      def body(s, carry):
        dx, acc = carry
        xt = varying_like(jax.lax.dynamic_slice_in_dim(xp, s, size), *refs)
        kt = None if kp is None else jax.lax.dynamic_slice_in_dim(kp, s, size)
        mine = (s + jnp.arange(size) < end)[:, None]
        dyt = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dyp, s, size), 0)
        _, vjp = jax.vjp(lambda a, p, q, r: _tile_ffn(a, p, q, r, kt), xt, *we)
        dxt, *g = vjp(dyt.astype(x.dtype))
        dxt = jnp.where(mine, dxt, 0).astype(dx.dtype)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dxt, s, 0)
        return dx, tuple(a + gi.astype(a.dtype) for a, gi in zip(acc, g))
      return body

    acc0 = tuple(varying_like(jnp.zeros(w.shape, acc_dtype(w)), *refs) for w in we)
    dx, acc = _segment_loop(starts[e], sizes[e], b, tile, (dx, acc0))
    dws = tuple(dw.at[e].set(a) for dw, a in zip(dws, acc))  # once per expert
    return dx, dws

  dx0 = varying_like(jnp.zeros(xp.shape, x.dtype), *refs)
  dws0 = tuple(varying_like(jnp.zeros(w.shape, acc_dtype(w)), *refs) for w in (w0, w1, wo))
  dx, (dw0, dw1, dwo) = jax.lax.fori_loop(0, w0.shape[0], expert_body, (dx0, dws0))
  dkeep = None if keep is None else jnp.zeros_like(keep)
  grads = (dx[:n], dw0.astype(w0.dtype), dw1.astype(w1.dtype), dwo.astype(wo.dtype))
  dx, dw0, dw1, dwo = (sum_to(g, v) for g, v in zip(grads, (x, w0, w1, wo)))
  return dx, None, dw0, dw1, dwo, dkeep


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _ragged(x, group_sizes, w0, w1, wo, keep):
  h = gated_activation(jax.lax.ragged_dot(x, w0, group_sizes), jax.lax.ragged_dot(x, w1, group_sizes))
  if keep is not None:
    h = h * keep.astype(h.dtype)
  y = jax.lax.ragged_dot(h, wo, group_sizes)
  valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y, 0)


def expert_ffn(x, group_sizes, wi_0, wi_1, wo, *, keep=None, impl: str = "auto",
               block_rows: int = 0):
  """Rows sorted by expert through their experts' FFNs.

  Args:
    x: [N, D] rows, expert 0's first, then expert 1's, ...; rows past sum(group_sizes) ignored.
    group_sizes: int32[E] rows per expert.
    wi_0: [E, D, 2F]; wi_1: [E, D, F]; wo: [E, F, D] (already in the compute dtype).
    keep: optional [N, F] dropout scale on the hidden activations (0 or 1/(1-rate)).
    impl: 'blocked', 'ragged_dot', 'pallas' or 'auto' (see `resolve`).
    block_rows: tile height for 'blocked'; 0 picks `block_rows_for(N, E)`.
  Returns:
    [N, D] in x's dtype; zeros past sum(group_sizes).
  """
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  # Parameters may arrive as numpy arrays (restored checkpoints): the loops index them by tracers.
  x, wi_0, wi_1, wo = (jnp.asarray(a) for a in (x, wi_0, wi_1, wo))
  impl = resolve(impl)
  if impl == "ragged_dot":
    return _ragged(x, group_sizes, wi_0, wi_1, wo, keep)
  if impl == "pallas":
    from openmoe_jax.model import pallas_grouped  # late: Pallas TPU kernels load only when chosen
    return pallas_grouped.expert_ffn(x, group_sizes, wi_0, wi_1, wo, keep=keep)
  if impl != "blocked":
    raise ValueError(f"unknown grouped matmul {impl!r}; choose from {GROUPED_MATMULS}")
  b = block_rows or block_rows_for(x.shape[0], wi_0.shape[0])
  return _blocked(x, group_sizes, wi_0, wi_1, wo, keep, b)
