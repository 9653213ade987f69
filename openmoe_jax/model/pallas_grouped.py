"""Grouped expert FFN on TPU: JAX's Pallas grouped matmul (megablox `gmm`).

The same function as `grouped.expert_ffn` (rows sorted by expert, `group_sizes[e]` rows for
expert e, zeros past sum(group_sizes)), as three calls of
`jax.experimental.pallas.ops.tpu.megablox.gmm`: a Mosaic kernel that walks row tiles and runs
each through its expert's weights, with a custom VJP (gmm for the input gradient, tgmm for the
per-expert weight gradients). Megablox is the grouped matmul of MaxText's dropless MoE.

Off TPU the kernel runs in Pallas interpret mode (slow; for tests). Row tiles are `tm` rows
(128, or the padded row count when smaller); rows are padded to a multiple of it.

Legend: N rows, D embed, F expert hidden, E experts.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp

from openmoe_jax.planning import target
from openmoe_jax.model.layers import gated_activation


def _tile(dim: int, cap: int = 128) -> int:
  return min(cap, dim)


def _vma(a) -> frozenset:
  try:
    return frozenset(jax.typeof(a).manual_axis_type.varying)
  except AttributeError:  # outside shard_map
    return frozenset()


def _cast_varying(a, axes: frozenset):
  """`a` as varying over `axes` too (a no-op outside shard_map)."""
  missing = tuple(sorted(axes - _vma(a)))
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def _untyped():
  """Megablox's pallas_call gives its outputs no varying-axes type, which shard_map's type check
  (check_vma) rejects: trace the kernels with the check off. Their operands all vary over the
  same mesh axes (`expert_ffn` casts them), and the results are given that type afterwards."""
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  flag = getattr(jax_config, "_check_vma", None)
  return flag(False) if flag is not None else contextlib.nullcontext()


def _kernels():
  import importlib  # pylint: disable=g-import-not-at-top
  # The module, not the package's `gmm` (megablox's custom-VJP op of the same name).
  mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  return mb.gmm, mb.tgmm


def _prepare(x, group_sizes, keep):
  """Rows padded to a multiple of the row tile, and the mask of rows inside some group."""
  n = x.shape[0]
  tm = _tile(-(-n // 8) * 8)
  pad = -n % tm
  valid = (jnp.arange(n + pad) < jnp.sum(group_sizes))[:, None]
  xp = jnp.where(valid, jnp.pad(x, ((0, pad), (0, 0))), 0)
  kp = None if keep is None else jnp.pad(keep, ((0, pad), (0, 0)))
  return tm, valid, xp, kp


def _mm(a, w, group_sizes, tm, valid, interpret, transpose=False, dtype=None):
  """Grouped a [M, K] x w [E, K, N] (or w^T); rows outside every group are zero (the kernel
  leaves them unwritten)."""
  gmm, _ = _kernels()
  k, n = (w.shape[2], w.shape[1]) if transpose else (w.shape[1], w.shape[2])
  out = gmm(a, w, group_sizes, dtype or a.dtype, (tm, _tile(k), _tile(n)),
            transpose_rhs=transpose, interpret=interpret)
  return jnp.where(valid, out, 0)


def _wgrad(a, g, group_sizes, tm, interpret, dtype):
  """Per-expert a[rows of e]^T g[rows of e]: [E, K, N] (float32 accumulation)."""
  _, tgmm = _kernels()
  return tgmm(a.T, g, group_sizes, jnp.float32, (tm, _tile(a.shape[1]), _tile(g.shape[1])),
              interpret=interpret).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ffn(x, group_sizes, wi_0, wi_1, wo, keep, interpret):
  return _ffn_fwd(x, group_sizes, wi_0, wi_1, wo, keep, interpret)[0]


def _ffn_fwd(x, group_sizes, wi_0, wi_1, wo, keep, interpret):
  axes = _vma(x)
  with _untyped():
    tm, valid, xp, kp = _prepare(x, group_sizes, keep)
    h0 = _mm(xp, wi_0, group_sizes, tm, valid, interpret)
    h1 = _mm(xp, wi_1, group_sizes, tm, valid, interpret)
    h = gated_activation(h0, h1)
    if kp is not None:
      h = h * kp.astype(h.dtype)
    y = _mm(h, wo, group_sizes, tm, valid, interpret)[:x.shape[0]]
  return _cast_varying(y, axes), (x, group_sizes, wi_0, wi_1, wo, keep, h0, h1)


def _ffn_bwd(interpret, res, dy):
  """dh = dy wo^T; through a * silu(b) * h1 (or silu(h0) * h1, the gated layout); dx = dh0 wi_0^T + dh1 wi_1^T; weight gradients
  per expert with tgmm (megablox's own VJP does the same per matmul)."""
  x, group_sizes, wi_0, wi_1, wo, keep, h0, h1 = res
  axes = _vma(x)
  n = x.shape[0]
  with _untyped():
    tm, valid, xp, kp = _prepare(x, group_sizes, keep)
    dyp = jnp.where(valid, jnp.pad(dy, ((0, xp.shape[0] - n), (0, 0))), 0).astype(x.dtype)
    gated = h0.shape[-1] == h1.shape[-1]  # silu(h0) * h1 (mlp_layout='gated'), else OpenMoE's
    a, b = (jnp.ones((), h0.dtype), h0) if gated else jnp.split(h0, 2, axis=-1)
    sig = jax.nn.sigmoid(b.astype(jnp.float32))
    silu = (b * sig).astype(h1.dtype)
    h = a * silu * h1
    if kp is not None:
      h = h * kp.astype(h.dtype)
    dwo = _wgrad(h, dyp, group_sizes, tm, interpret, wo.dtype)
    dh = _mm(dyp, wo, group_sizes, tm, valid, interpret, transpose=True)
    if kp is not None:
      dh = dh * kp.astype(dh.dtype)
    dsilu = (sig * (1 + b * (1 - sig))).astype(dh.dtype)
    dh0 = (dh * h1 * dsilu if gated
           else jnp.concatenate([dh * silu * h1, dh * a * h1 * dsilu], axis=-1))
    dh1 = dh * a * silu
    dx = (_mm(dh0, wi_0, group_sizes, tm, valid, interpret, transpose=True, dtype=jnp.float32)
          + _mm(dh1, wi_1, group_sizes, tm, valid, interpret, transpose=True,
                dtype=jnp.float32))[:n].astype(x.dtype)
    dw0 = _wgrad(xp, dh0, group_sizes, tm, interpret, wi_0.dtype)
    dw1 = _wgrad(xp, dh1, group_sizes, tm, interpret, wi_1.dtype)
  dx, dw0, dw1, dwo = (_cast_varying(g, axes) for g in (dx, dw0, dw1, dwo))
  return dx, None, dw0, dw1, dwo, None if keep is None else jnp.zeros_like(keep)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def expert_ffn(x, group_sizes, wi_0, wi_1, wo, *, keep=None, interpret=None):
  """Rows sorted by expert through their experts' FFNs ([N, D] -> [N, D]; see grouped.py).

  interpret: run the Pallas kernels in interpret mode; default: unless compiling for TPU.
  Under shard_map every operand is cast to vary over all the mesh axes any of them varies over,
  so a gradient is summed over the axes its operand was replicated on (the cast's transpose):
  weights over the rows' `data` axis, rows over the weights' `model` axis.
  """
  if interpret is None:
    interpret = target.platform() != "tpu"
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  axes = frozenset().union(*(_vma(a) for a in (x, group_sizes, wi_0, wi_1, wo, keep)
                             if a is not None))
  x, group_sizes, wi_0, wi_1, wo = (_cast_varying(a, axes)
                                    for a in (x, group_sizes, wi_0, wi_1, wo))
  if keep is not None:
    keep = _cast_varying(keep, axes)
  return _ffn(x, group_sizes, wi_0, wi_1, wo, keep, interpret)
