"""Rotary position embeddings (Su et al. 2021, arXiv:2104.09864), half-rotation form, with
YaRN scaling (Peng et al. 2023, arXiv:2309.00071) as DeepSeek-V2/V3 configure it.

Legend: B batch, L length, N heads, R rotated values of a head.

Without scaling (OpenMoE and every family but DeepSeek's): frequencies theta^(-2i/R), the angle
computed as position / theta^(2i/R), bitwise what OpenMoE's layers always computed. YaRN blends,
per frequency, the original one (extrapolation, the fast-rotating dimensions) and the one
divided by the scaling factor (interpolation, the slow ones) over a linear ramp between the
dimensions that rotate beta_fast and beta_slow times over the original context, and multiplies
cos and sin by an attention factor: transformers `modeling_rope_utils._compute_yarn_parameters`
(truncated correction range), in float32 as there.

Layouts: the rotated values of a head are in half-rotation order (x_0..x_{R/2-1} pair with
x_{R/2}..x_{R-1}). DeepSeek's checkpoints store them interleaved (pairs (x_0, x_1), ...);
openmoe-import reorders those rows (`interleaved_to_half`) and openmoe-export restores them.
"""
import math

import jax.numpy as jnp
import numpy as np


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """float32[dim / 2] YaRN inverse frequencies (transformers' computation, truncate=True)."""
  def correction_dim(rotations):
    return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # transformers: prevents a zero-width ramp
  pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation = np.float32(1.0) / pos_freqs
  interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
  keep = np.float32(1.0) - ramp.astype(np.float32)
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x, positions, max_timescale: float, *, inv_freq=None,
               attention_factor: float = 1.0):
  """RoPE over the last axis of x [B, L, N, R]; positions int[B, L].

  inv_freq: None (theta = max_timescale, OpenMoE's computation) or float32[R / 2] frequencies
  (YaRN's), whose cos and sin are multiplied by attention_factor (transformers: in float32,
  then cast to x's dtype).
  """
  dim = x.shape[-1]
  if inv_freq is None:
    fraction = 2 * jnp.arange(dim // 2, dtype=jnp.float32) / dim
    timescale = max_timescale**fraction
    angle = positions.astype(jnp.float32)[..., None] / timescale[None, None, :]
  else:
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  if attention_factor != 1.0:
    sin, cos = sin * attention_factor, cos * attention_factor
  sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
  return x * cos + rotate_half(x) * sin


def for_config(cfg):
  """apply_rope's keyword arguments for a ModelConfig (its `rope_scaling`)."""
  if cfg.rope_scaling == "none":
    return {}
  return {"inv_freq": yarn_inv_freq(cfg.rope_dim, cfg.rope_max_timescale,
                                    cfg.rope_scaling_factor, cfg.rope_original_max_len,
                                    cfg.rope_beta_fast, cfg.rope_beta_slow),
          "attention_factor": cfg.rope_attention_factor}


def interleaved_to_half(dim: int) -> tuple:
  """dim ints: out[i] = in[order[i]] turns interleaved rotary values (pairs (x_0, x_1), ...)
  into half-rotation order (x_0, x_2, ..., x_1, x_3, ...). The same reordering of queries and
  keys leaves every q . k unchanged (transformers `apply_rotary_pos_emb_interleave`)."""
  return (*range(0, dim, 2), *range(1, dim, 2))
