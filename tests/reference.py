"""Independent float64 numpy references used only by tests: routing, MoE loop, FFN."""
import numpy as np


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def route(logits, k, capacity, renormalize=False):
  """Plain-loop token-choice routing: first choices of all tokens left to right, then seconds."""
  logits = np.asarray(logits, np.float64)
  g, t, e = logits.shape
  probs = softmax(logits)
  index = np.zeros((g, t, k), np.int64)
  gates = np.zeros((g, t, k))
  for gi in range(g):
    for ti in range(t):
      order = sorted(range(e), key=lambda j: (-probs[gi, ti, j], j))[:k]
      index[gi, ti] = order
      gates[gi, ti] = probs[gi, ti, order]
  if renormalize:
    gates = gates / gates.sum(-1, keepdims=True)
  position = np.zeros((g, t, k), np.int64)
  kept = np.zeros((g, t, k), bool)
  for gi in range(g):
    count = np.zeros(e, np.int64)
    for ki in range(k):
      for ti in range(t):
        ex = index[gi, ti, ki]
        position[gi, ti, ki] = count[ex]
        kept[gi, ti, ki] = count[ex] < capacity
        count[ex] += 1
  f = np.zeros((g, e))
  for gi in range(g):
    for ti in range(t):
      for ex in set(index[gi, ti]):
        f[gi, ex] += 1.0 / t
  aux = np.mean(f * probs.mean(axis=1)) * e * e
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return dict(index=index, gates=gates, position=position, kept=kept, probs=probs,
              combine=np.where(kept, gates, 0.0), aux=aux, z=np.mean(log_z**2))


def silu(x):
  return x / (1.0 + np.exp(-x))


def _exact(x):
  return x


def bf16(x):
  """Round to bfloat16 (nearest even) and back to float64: the cast the model makes."""
  import ml_dtypes
  return np.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def ffn(x, wi_0, wi_1, wo, act=_exact):
  """Three-projection FFN; `act` rounds where the model casts to its activation dtype."""
  wi_0, wi_1, wo = act(wi_0), act(wi_1), act(wo)
  h0 = act(x @ wi_0)
  f = wi_1.shape[-1]
  gated = act(act(h0[..., :f] * act(silu(h0[..., f:]))) * act(x @ wi_1))
  return act(gated @ wo)


def moe(x_groups, router_kernel, wi_0, wi_1, wo, k, capacity, renormalize=False, act=_exact):
  """x_groups: [G, T, D] float64 -> [G, T, D] by looping over tokens and their kept experts.

  The router and the combine run in float64 (the model: float32); experts round with `act`."""
  x = np.asarray(x_groups, np.float64)
  logits = x @ np.asarray(router_kernel, np.float64)
  r = route(logits, k, capacity, renormalize)
  y = np.zeros_like(x)
  for gi in range(x.shape[0]):
    for ti in range(x.shape[1]):
      for ki in range(k):
        if r["kept"][gi, ti, ki]:
          e = r["index"][gi, ti, ki]
          y[gi, ti] += r["gates"][gi, ti, ki] * ffn(x[gi, ti], wi_0[e], wi_1[e], wo[e], act)
  return y, r


def maybe_pad(x, multiple):
  """flaxformer `moe_layers._maybe_pad`, written out: zero rows or zero columns (fewer padding
  tokens wins, columns on a tie) so that B * L is a multiple of `multiple`."""
  b, length = x.shape[:2]
  if (b * length) % multiple == 0:
    return x
  rows = next(r for r in range(1, multiple + 1) if ((b + r) * length) % multiple == 0)
  cols = next(c for c in range(1, multiple + 1) if (b * (length + c)) % multiple == 0)
  if cols * b > rows * length:
    return np.concatenate([x, np.zeros((rows,) + x.shape[1:])], 0)
  return np.concatenate([x, np.zeros((b, cols) + x.shape[2:])], 1)


def rms_norm(x, scale, eps=1e-6, act=_exact):
  """flaxformer T5LayerNorm: normalise (float32), cast, multiply by the cast scale, cast."""
  return act(act(x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)) * act(scale))


def rope(x, positions, theta=1e4, act=_exact):
  """x: [L, N, H]; half rotation with timescales theta^(2j/H)."""
  h = x.shape[-1]
  inv = theta ** (-(2 * np.arange(h // 2)) / h)
  ang = positions[:, None].astype(np.float64) * inv[None, :]
  ang = np.concatenate([ang, ang], -1)[:, None, :]
  rot = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
  return act(act(x * act(np.cos(ang))) + act(rot * act(np.sin(ang))))


def _attention(x, lp, cfg, positions, segment_ids, real, act, logit_act):
  b, length, _ = x.shape
  n, hd = cfg.num_heads, cfg.head_dim
  sa = lp["self_attention"]
  out = np.zeros_like(x)
  for bi in range(b):
    q, k, v = (act(x[bi] @ act(sa[name]["kernel"])).reshape(length, n, hd)
               for name in ("query", "key", "value"))
    q, k = rope(q, positions[bi], act=act), rope(k, positions[bi], act=act)
    ctx = np.zeros((length, n, hd))
    for qi in range(length):
      allowed = [ki for ki in range(qi + 1) if segment_ids[bi, ki] == segment_ids[bi, qi]
                 and real[bi, ki] and real[bi, qi]]
      for hi in range(n):
        if not allowed:  # fully masked row: uniform over all keys, like softmax of equal biases
          ctx[qi, hi] = act(v[:, hi].mean(0))
          continue
        s = logit_act(np.array([q[qi, hi] @ k[ki, hi] for ki in allowed]))
        # jax.nn.softmax's steps, each rounded to the logits' dtype.
        u = logit_act(np.exp(logit_act(s - s.max())))
        w = act(logit_act(u / logit_act(u.sum())))
        ctx[qi, hi] = act(sum(wj * v[kj, hi] for wj, kj in zip(w, allowed)))
    out[bi] = act(ctx.reshape(length, n * hd) @ act(sa["out"]["kernel"]))
  return out


def forward(params, cfg, tokens, positions=None, segment_ids=None, targets=None, capacity=None,
            group_tokens=None, bf16_casts=False, moe_float32_output=True, float32_norm=False,
            float32_attention_logits=False, pad_multiple=None):
  """Float64 loop implementation of the whole decoder for one batch. Returns logits [B, L, V].

  capacity/group_tokens: routing settings of the MoE layers (tokens are grouped over the
  flattened batch exactly as the model does, after zero padding to a multiple of
  `pad_multiple` (E x replicas) when given, as flaxformer `_maybe_pad`).
  bf16_casts: round to bfloat16 wherever flaxformer's OpenMoE casts to its activation dtype
  (embeddings, every projection's inputs, kernels and outputs, norms, RoPE, attention logits and
  probabilities, the residual stream up to the first MoE layer). The other flags switch single
  casts off, to show what each one changes: moe_float32_output=False rounds the MoE output and
  keeps the residual bfloat16; float32_norm scales before rounding; float32_attention_logits
  keeps logits and softmax unrounded.
  """
  act = bf16 if bf16_casts else _exact
  logit_act = _exact if float32_attention_logits else act
  p = params
  tokens = np.asarray(tokens)
  b, length = tokens.shape
  positions = np.broadcast_to(np.arange(length), (b, length)) if positions is None else positions
  segment_ids = np.ones((b, length), int) if segment_ids is None else np.asarray(segment_ids)
  real = np.ones((b, length), bool) if targets is None else np.asarray(targets) > 0
  shifted = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  keep = ((tokens > 0) | (shifted > 0) | (np.arange(length) == 0)[None])[..., None]
  h = act(np.asarray(p["token_embedder"]["embedding"], np.float64)[tokens])
  residual = act  # bfloat16 until a float32 MoE output promotes it
  eps = cfg.norm_eps

  def norm(x, scale):
    if float32_norm:
      return act(rms_norm(x, scale, eps))
    return rms_norm(x, scale, eps, act)

  for i in range(cfg.num_layers):
    lp = jax_free(p["decoder"][f"layers_{i}"])
    x = norm(h, lp["pre_self_attention_layer_norm"]["scale"]) * keep
    h = residual(h + _attention(x, lp, cfg, positions, segment_ids, real, act, logit_act))
    x = norm(h, lp["pre_mlp_layer_norm"]["scale"]) * keep
    if cfg.is_moe_layer(i):
      m = lp["mlp"]
      xp = x if pad_multiple is None else maybe_pad(x, pad_multiple)
      xg = xp.reshape(-1, group_tokens, x.shape[-1])
      y, _ = moe(xg, m["router"]["router_weights"]["w"]["kernel"], m["expert"]["wi_0"]["kernel"],
                 m["expert"]["wi_1"]["kernel"], m["expert"]["wo"]["kernel"],
                 cfg.num_selected_experts, capacity, cfg.renormalize_gates, act)
      y = y.reshape(xp.shape)[:b, :length]
      if moe_float32_output:
        residual = _exact
      else:
        y = act(y)
      h = residual(h + y)
      x = norm(h, lp["pre_extra_mlp_layer_norm"]["scale"]) * keep
      e = lp["extra_mlp"]
    else:
      e = lp["mlp"]
    h = residual(h + ffn(x, e["wi_0"]["kernel"], e["wi_1"]["kernel"], e["wo"]["kernel"], act))
  h = norm(h, np.asarray(p["decoder"]["decoder_norm"]["scale"], np.float64))
  return h @ np.asarray(p["decoder"]["logits_dense"]["kernel"], np.float64)


def jax_free(tree):
  if isinstance(tree, dict):
    return {k: jax_free(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def combine_loop(x_groups, index, gates, kept, wi_0, wi_1, wo):
  """y[g, t] = sum over kept k of gates * FFN_{index}(x[g, t]), by plain loops (float64)."""
  x = np.asarray(x_groups, np.float64)
  y = np.zeros_like(x)
  for gi, ti, ki in zip(*np.nonzero(np.asarray(kept))):
    e = index[gi, ti, ki]
    y[gi, ti] += gates[gi, ti, ki] * ffn(x[gi, ti], wi_0[e], wi_1[e], wo[e])
  return y


def water_fill(load, budget):
  """Capacities c_e <= load_e, sum = min(budget, sum(load)), raised one level at a time."""
  load = np.asarray(load, np.int64)
  caps = np.zeros_like(load)
  left = int(budget)
  while left > 0 and (caps < load).any():
    for e in range(len(load)):  # one more slot to every expert still short, lowest index first
      if left > 0 and caps[e] < load[e]:
        caps[e] += 1
        left -= 1
  return caps
