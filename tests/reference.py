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


def ffn(x, wi_0, wi_1, wo):
  h0 = x @ wi_0
  f = wi_1.shape[-1]
  return ((h0[..., :f] * silu(h0[..., f:])) * (x @ wi_1)) @ wo


def moe(x_groups, router_kernel, wi_0, wi_1, wo, k, capacity, renormalize=False):
  """x_groups: [G, T, D] float64 -> [G, T, D] by looping over tokens and their kept experts."""
  x = np.asarray(x_groups, np.float64)
  logits = x @ np.asarray(router_kernel, np.float64)
  r = route(logits, k, capacity, renormalize)
  y = np.zeros_like(x)
  for gi in range(x.shape[0]):
    for ti in range(x.shape[1]):
      for ki in range(k):
        if r["kept"][gi, ti, ki]:
          e = r["index"][gi, ti, ki]
          y[gi, ti] += r["gates"][gi, ti, ki] * ffn(x[gi, ti], wi_0[e], wi_1[e], wo[e])
  return y, r
