"""Cached decoding: equals full-prefix decoding without drops, routes each call's tokens with
capacity like a float64 reference, samples like numpy, stops, shards, and does not recompile."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.evaluation import decoding
from openmoe_jax.model import routing
from openmoe_jax.model import partitioning as part
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer
import reference

CFG = ModelConfig(vocab_size=512, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  expert_mlp_dim=64, num_layers=2, num_experts=8, num_sparse_layers=1,
                  group_size=64, activation_dtype="float32", scale=1.0, router_init_stddev=1.0)
PROMPTS = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [300, 301]]


@pytest.fixture(scope="module")
def params():
  p = Transformer(CFG).init(jax.random.key(1), jnp.ones((1, 16), jnp.int32))["params"]
  return part.unbox(p)


def _full_prefix_greedy(cfg, params, prompt, steps):
  """Re-runs the whole sequence for every new token (no cache), right-padded to a multiple of E."""
  fn = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
  seq = [0] + list(prompt)
  for _ in range(steps):
    x = np.zeros((1, -(-len(seq) // 8) * 8), np.int32)
    x[0, :len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(fn(params, x))[0, len(seq) - 1])))
  return seq[len(prompt) + 1:]


@pytest.mark.parametrize("routing_mode", [dict(no_drop=True), dict(capacity_mode="dropless")])
def test_cached_greedy_equals_full_prefix_without_drops(params, routing_mode):
  cfg = CFG.replace(**routing_mode)
  got = decoding.generate(params, cfg, PROMPTS, max_new_tokens=8, eos_id=-1)
  for prompt, g in zip(PROMPTS, got):
    assert g.ids == _full_prefix_greedy(cfg, params, prompt, 8) and g.finish == "length"
    assert len(g.log_probs) == 8 and all(lp <= 0 for lp in g.log_probs)
  # Batching (and the batch's left padding) changes nothing; neither do batches of 3.
  alone = [decoding.generate(params, cfg, [p], max_new_tokens=8, eos_id=-1)[0] for p in PROMPTS]
  assert [g.ids for g in alone] == [g.ids for g in got]
  np.testing.assert_allclose([g.log_probs for g in alone], [g.log_probs for g in got], atol=1e-5)
  chunked = decoding.generate(params, cfg, PROMPTS, max_new_tokens=8, eos_id=-1, batch_size=3)
  assert [g.ids for g in chunked] == [g.ids for g in got]


def _reference_decode(params, cfg, prompts, steps):
  """Float64 loops: per call, every layer on the call's new tokens with per-row K/V lists; the
  MoE layer routes the call's B x T tokens as flaxformer does: zero rows or columns padded to a
  multiple of E (whichever needs fewer), flaxformer groups, max(round(cf * G / E), min) slots.
  Returns greedy tokens and their log-probs per row."""
  p = reference.jax_free(params)
  b, n, hd = len(prompts), cfg.num_heads, cfg.head_dim
  cache = [[([], []) for _ in range(b)] for _ in range(cfg.num_layers)]
  new, out, logps = np.asarray([[0] + list(q) for q in prompts]), [[] for _ in range(b)], [[] for _ in range(b)]
  for _ in range(steps + 1):
    t = new.shape[1]
    h = p["token_embedder"]["embedding"][new]
    for i in range(cfg.num_layers):
      lp = p["decoder"][f"layers_{i}"]
      x = reference.rms_norm(h, lp["pre_self_attention_layer_norm"]["scale"])
      att = np.zeros_like(h)
      for r in range(b):
        ks, vs = cache[i][r]
        pos = len(ks) + np.arange(t)
        proj = lambda name: (x[r] @ lp["self_attention"][name]["kernel"]).reshape(t, n, hd)
        q, k, v = reference.rope(proj("query"), pos), reference.rope(proj("key"), pos), proj("value")
        ks.extend(k)
        vs.extend(v)
        kk, vv = np.stack(ks), np.stack(vs)
        ctx = np.zeros((t, n, hd))
        for qi in range(t):
          for hi in range(n):
            w = reference.softmax(kk[:pos[qi] + 1, hi] @ q[qi, hi])
            ctx[qi, hi] = w @ vv[:pos[qi] + 1, hi]
        att[r] = ctx.reshape(t, n * hd) @ lp["self_attention"]["out"]["kernel"]
      h = h + att
      x = reference.rms_norm(h, lp["pre_mlp_layer_norm"]["scale"])
      if cfg.is_moe_layer(i):
        m = lp["mlp"]
        pad_rows, pad_cols = routing.token_padding(b, t, cfg.num_experts)
        xp = np.pad(x, ((0, pad_rows), (0, pad_cols), (0, 0)))
        groups = routing.num_groups(xp.shape[0] * xp.shape[1], cfg.group_size, cfg.num_experts)
        size = xp.shape[0] * xp.shape[1] // groups
        capacity = max(int(round(cfg.eval_capacity_factor * size / cfg.num_experts)),
                       cfg.min_expert_capacity)
        y, _ = reference.moe(xp.reshape(groups, size, -1), m["router"]["router_weights"]["w"]["kernel"],
                             m["expert"]["wi_0"]["kernel"], m["expert"]["wi_1"]["kernel"],
                             m["expert"]["wo"]["kernel"], cfg.num_selected_experts, capacity)
        h = h + y.reshape(xp.shape)[:b, :t]
        x = reference.rms_norm(h, lp["pre_extra_mlp_layer_norm"]["scale"])
        e = lp["extra_mlp"]
      else:
        e = lp["mlp"]
      h = h + reference.ffn(x, e["wi_0"]["kernel"], e["wi_1"]["kernel"], e["wo"]["kernel"])
    h = reference.rms_norm(h[:, -1], p["decoder"]["decoder_norm"]["scale"])
    logits = h @ p["decoder"]["logits_dense"]["kernel"]
    logp = np.log(reference.softmax(logits))
    tok = np.argmax(logits, -1)
    for r in range(b):
      out[r].append(int(tok[r]))
      logps[r].append(float(logp[r, tok[r]]))
    new = tok[:, None]
  return [o[:steps] for o in out], [l[:steps] for l in logps]


def test_decode_time_capacity_routing_matches_reference(params):
  # 12 equal-length prompts: prefill routes 12 x 8 tokens in 8 groups of 12 (2 slots per expert);
  # each step pads its 12 tokens with 4 zero rows to 16 = 2 per group, 1 slot per expert: the
  # second choices of a group's two tokens collide with each other's first, so drops are certain.
  cfg = CFG.replace(eval_capacity_factor=1.0, min_expert_capacity=1)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 512, 7)) for _ in range(12)]
  got = decoding.generate(params, cfg, prompts, max_new_tokens=3, eos_id=-1)
  want_ids, want_logp = _reference_decode(params, cfg, prompts, 3)
  assert [g.ids for g in got] == want_ids
  np.testing.assert_allclose([g.log_probs for g in got], want_logp, atol=1e-4)
  no_drop = decoding.generate(params, cfg.replace(no_drop=True), prompts, max_new_tokens=3,
                              eos_id=-1)
  assert not np.allclose([g.log_probs for g in no_drop], want_logp, atol=1e-3)  # drops bite


def _np_filter(logits, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  out = np.full_like(x, -np.inf)
  for r in range(x.shape[0]):
    order = np.argsort(-x[r], kind="stable")
    keep = order[:top_k] if top_k else order
    probs = reference.softmax(x[r, keep])
    mass, chosen = 0.0, []
    for j, pr in zip(keep, probs):
      if mass >= top_p:
        break
      chosen.append(j)
      mass += pr
    out[r, chosen] = x[r, chosen]
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0),
                                                     (1.3, 0, 0.6), (0.5, 20, 0.9)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(3), (4, 64)) * 3
  got = decoding.filter_logits(logits, decoding.Sampling(temperature, top_k, top_p))
  want = _np_filter(logits, temperature, top_k, top_p)
  assert np.array_equal(np.isinf(np.asarray(got)), np.isinf(want))
  np.testing.assert_allclose(np.where(np.isinf(want), 0, np.asarray(got)),
                             np.where(np.isinf(want), 0, want), rtol=1e-5)


def test_sampling_draws_from_the_filtered_distribution():
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
  sampling = decoding.Sampling(temperature=0.8, top_k=4, top_p=0.95)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: decoding.sample(logits, k, sampling))(keys))[:, 0]
  want = reference.softmax(np.where(np.isinf(f := _np_filter(logits, 0.8, 4, 0.95)), -1e30, f))[0]
  freq = np.bincount(draws, minlength=6) / len(draws)
  np.testing.assert_allclose(freq, want, atol=0.012)
  assert freq[4] == freq[5] == 0


def test_sampled_generation_is_reproducible_per_key(params):
  s = decoding.Sampling(temperature=1.0, top_k=50)
  run = lambda seed: [g.ids for g in decoding.generate(
      params, CFG, PROMPTS, max_new_tokens=8, sampling=s, rng=jax.random.key(seed), eos_id=-1)]
  assert run(0) == run(0) and run(0) != run(1)


def test_eos_and_stop_sequences_end_rows(params):
  free = decoding.generate(params, CFG, PROMPTS, max_new_tokens=10, eos_id=-1)
  row = free[0].ids
  eos = decoding.generate(params, CFG, PROMPTS[:1], max_new_tokens=10, eos_id=row[3])[0]
  assert eos.ids == row[:row.index(row[3])] and eos.finish == "eos"
  stop = decoding.generate(params, CFG, PROMPTS[:1], max_new_tokens=10, eos_id=-1,
                           stop_sequences=[[9999, 9998], row[4:6]])[0]
  assert stop.finish == "stop" and stop.ids == row[:4]
  np.testing.assert_allclose(stop.log_probs, free[0].log_probs[:4], atol=1e-5)
  short = decoding.generate(params, CFG, PROMPTS, max_new_tokens=3, eos_id=-1)
  assert [g.ids for g in short] == [g.ids[:3] for g in free]


def test_sharded_decoding_equals_one_device_and_cache_is_sharded(params):
  cfg = CFG.replace(no_drop=True)
  mesh = part.make_mesh(num_expert_partitions=2, num_model_partitions=2)  # (2, 2, 2)
  want = decoding.generate(params, cfg, PROMPTS, max_new_tokens=6, eos_id=-1)
  got = decoding.generate(params, cfg, PROMPTS, max_new_tokens=6, eos_id=-1, mesh=mesh)
  assert [g.ids for g in got] == [g.ids for g in want]
  tokens, start = decoding.left_pad([[0, 5, 6]] * 4, 8, 4)
  with decoding._mesh_context(mesh):  # pylint: disable=protected-access
    placed = decoding.place_params(params, cfg, mesh)
    _, cache = jax.jit(lambda p, t, s: decoding.prefill(p, cfg, t, s, 8))(placed, tokens, start)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert"), None,
                                                                    "model", None))
  for c in cache.keys + cache.values:  # [B, S, N, H]: batch and heads sharded
    assert c.sharding.is_equivalent_to(want, 4), c.sharding


def test_one_compilation_per_bucket(params):
  cfg = CFG.replace(no_drop=True, eval_capacity_factor=3.0)  # a config no other test compiles
  for prompts in ([[5, 6]], [[7, 8, 9, 10]], [[1] * 6]):  # all in the 8-column prompt bucket
    decoding.generate(params, cfg, prompts, max_new_tokens=5, eos_id=-1)
  fn = decoding._compiled(cfg, decoding.Sampling(), 8, -1, None)  # pylint: disable=protected-access
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  decoding.generate(params, cfg, [[5] * 9], max_new_tokens=5, eos_id=-1)
  assert fn._cache_size() == 2  # pylint: disable=protected-access


def test_bad_arguments():
  with pytest.raises(ValueError, match="top_p"):
    decoding.Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.generate({}, CFG, [[1]], max_new_tokens=0)
  assert decoding.bucket(1) == 8 and decoding.bucket(9) == 16 and decoding.bucket(16) == 16


# --------------------------------------------------------------------------- beam search
# A 16-token vocabulary, so that EOS (id 12 here: the best beams of PROMPTS16 end both ways) and
# stop sequences compete with continuing, and an exhaustive search stays small.
CFG16 = CFG.replace(vocab_size=16, no_drop=True)
PROMPTS16 = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 2, 3, 4, 5, 6], [10, 2]]
EOS16 = 12


@pytest.fixture(scope="module")
def params16():
  p = Transformer(CFG16).init(jax.random.key(1), jnp.ones((1, 16), jnp.int32))["params"]
  return part.unbox(p)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda p, t: jax.nn.log_softmax(Transformer(cfg).apply({"params": p}, t)[0]))


def _full_logp(cfg, params, seqs):
  """float64[len(seqs), L, V] next-token log-probs of one full forward pass (no cache) over the
  rows right-padded with zeros to L = 16 or 32 (causal: padding after a token changes nothing)."""
  x = np.zeros((len(seqs), decoding.bucket(max(map(len, seqs)), 16)), np.int32)
  for i, s in enumerate(seqs):
    x[i, :len(s)] = s
  return np.asarray(_forward(cfg)(params, x), np.float64)


def _rescore(cfg, params, prompt, ids):
  """float64[len(ids)] ln p(ids[i] | BOS, prompt, ids[:i]) from a full forward pass."""
  seq = [0] + list(prompt) + list(ids)
  logp = _full_logp(cfg, params, [seq])[0]
  return logp[np.arange(len(prompt), len(seq) - 1), seq[len(prompt) + 1:]]


def _with_eos(g, eos_id):
  """Every generated token of a beam: its ids, and the EOS that ended it."""
  return tuple(g.ids) + ((eos_id,) if g.finish == "eos" else ())


def test_beam_search_with_one_beam_is_greedy(params):
  # Capacity routing included: with one beam every call routes the same tokens as greedy's.
  want = decoding.generate(params, CFG, PROMPTS, max_new_tokens=8, eos_id=-1)
  got = decoding.beam_search(params, CFG, PROMPTS, max_new_tokens=8, num_beams=1, eos_id=-1)
  assert [g.ids for g in got] == [g.ids for g in want]
  assert all(g.finish == "length" for g in got)
  np.testing.assert_allclose([g.log_probs for g in got], [g.log_probs for g in want], atol=1e-6)


def test_beam_search_beats_greedy_and_reports_the_rescored_log_prob(params):
  # Without EOS every completion has max_new_tokens tokens, so the score ranks by log-prob alone.
  # Beam search does not guarantee beating greedy in general; on this model it does, per prompt.
  cfg = CFG.replace(no_drop=True)
  greedy = decoding.generate(params, cfg, PROMPTS, max_new_tokens=6, eos_id=-1)
  beams = decoding.beam_search(params, cfg, PROMPTS, max_new_tokens=6, num_beams=4, eos_id=-1)
  gains = []
  for prompt, g, b in zip(PROMPTS, greedy, beams):
    rescored = _rescore(cfg, params, prompt, b.ids)  # float32 model, no cache: within 1e-4
    np.testing.assert_allclose(b.log_probs, rescored, atol=1e-4)
    assert abs(b.log_prob - rescored.sum()) < 1e-4
    assert abs(b.score - b.log_prob / decoding.brevity_penalty(0.6, 6)) < 1e-5
    greedy_total = _rescore(cfg, params, prompt, g.ids).sum()
    assert rescored.sum() >= greedy_total - 1e-5
    gains.append(rescored.sum() - greedy_total)
  assert max(gains) > 0.1, gains  # the beams found something greedy did not


def _np_beam_search(logp_fn, prompt, k, steps, alpha, eos_id, stop_sequences=()):
  """t5x's beam search in float64 over next-token log-probs logp_fn(list of sequences), without
  early stopping: per step the best 2K extensions of the live beams; those ending (EOS, a stop
  sequence, the last step) join the K best finished by log_prob / ((5 + n) / 6) ** alpha, the K
  best others stay live. Returns the finished beams, best first, as (score, tokens, log_prob)."""
  live, finished = [((), 0.0)], []
  for step in range(steps):
    logp = logp_fn([list(prompt) + list(s) for s, _ in live])
    cands = sorted(((total + logp[i, t], s + (t,)) for i, (s, total) in enumerate(live)
                    for t in range(logp.shape[1])), key=lambda c: -c[0])[:2 * k]
    ends = lambda s: (s[-1] == eos_id or step + 1 == steps
                      or any(len(s) >= len(q) and list(s[-len(q):]) == list(q)
                             for q in stop_sequences))
    finished += [(total / ((5 + step + 1) / 6) ** alpha, s, total) for total, s in cands if ends(s)]
    finished = sorted(finished, key=lambda f: -f[0])[:k]
    live = [(s, total) for total, s in cands if not ends(s)][:k]
  return finished


@pytest.mark.parametrize("alpha,stops", [(0.6, ()), (0.0, ()), (2.0, [[3, 4], [15]])])
def test_beam_search_matches_a_float64_reference(params16, alpha, stops):
  k, steps = 3, 5
  got = decoding.beam_search(params16, CFG16, PROMPTS16, max_new_tokens=steps, num_beams=k,
                             alpha=alpha, eos_id=EOS16, stop_sequences=stops, all_beams=True)
  finishes = set()
  for prompt, beams in zip(PROMPTS16, got):
    full = [0] + prompt
    logp_fn = lambda seqs: np.stack([_full_logp(CFG16, params16, seqs)[i, len(s) - 1]
                                     for i, s in enumerate(seqs)])
    want = _np_beam_search(logp_fn, full, k, steps, alpha, EOS16, stops)
    assert len(beams) == len(want) == k
    for b, (score, tokens, total) in zip(beams, want):
      finishes.add(b.finish)
      assert list(tokens[:len(b.ids)]) == b.ids, (b, tokens)
      tail = list(tokens[len(b.ids):])  # what ended the beam
      assert {"eos": tail == [EOS16], "stop": tail in stops,
              "length": not tail and len(tokens) == steps}[b.finish], (b, tokens)
      assert abs(b.score - score) < 1e-4 and abs(b.log_prob - total) < 1e-4
      np.testing.assert_allclose(b.log_probs, [logp_fn([full + list(tokens[:i])])[0, t]
                                               for i, t in enumerate(b.ids)], atol=1e-4)
  assert {"eos", "length"} <= finishes and ("stop" in finishes) == bool(stops)


def test_beam_search_is_exhaustive_with_enough_beams(params16):
  # 3 tokens over 16: with K = 256 >= 16^2 beams every prefix stays live, so the K finished beams
  # are the K best of all 16 + 15 * 16 + 15^2 * 16 completions (EOS ends one early).
  prompt, alpha = [5, 6, 7], 0.6
  full = [0] + prompt
  seconds = [[a, b] for a in range(16) for b in range(16) if EOS16 not in (a, b)]
  logp = _full_logp(CFG16, params16, [full + s for s in seconds])  # one pass: [225, 16, V]
  p = len(full) - 1
  scored = {}
  for i, (a, b) in enumerate(seconds):
    for t, n in (([a], 1), ([a, b], 2)):
      ln = sum(logp[i, p + j, x] for j, x in enumerate(t[:n]))
      scored[tuple(t) + (EOS16,)] = (ln + logp[i, p + n, EOS16]) / ((5 + n + 1) / 6) ** alpha
    for c in range(16):
      ln = logp[i, p, a] + logp[i, p + 1, b] + logp[i, p + 2, c]
      scored[(a, b, c)] = ln / ((5 + 3) / 6) ** alpha
  scored[(EOS16,)] = logp[0, p, EOS16] / (6 / 6) ** alpha
  best = sorted(scored.items(), key=lambda kv: -kv[1])
  beams = decoding.beam_search(params16, CFG16, [prompt], max_new_tokens=3, num_beams=256,
                               alpha=alpha, eos_id=EOS16, all_beams=True)[0]
  assert _with_eos(beams[0], EOS16) == best[0][0]
  np.testing.assert_allclose([b.score for b in beams], [s for _, s in best[:256]], atol=1e-4)
  for b in beams:  # each its own score, whatever the order of near-ties
    assert abs(scored[_with_eos(b, EOS16)] - b.score) < 1e-4


def test_beam_search_batched_equals_alone_and_compiles_once_per_bucket(params16):
  run = lambda prompts, **kw: decoding.beam_search(
      params16, CFG16, prompts, max_new_tokens=5, num_beams=3, eos_id=EOS16, all_beams=True, **kw)
  together, chunked = run(PROMPTS16), run(PROMPTS16, batch_size=3)
  fn = decoding._compiled_beam(CFG16, 3, 8, EOS16, None)  # pylint: disable=protected-access
  alone, compiled = [], []
  for p in PROMPTS16:
    alone.append(run([p])[0])
    compiled.append(fn._cache_size())  # pylint: disable=protected-access
  for a, b, c in zip(alone, together, chunked):
    assert [x.ids for x in a] == [x.ids for x in b] == [x.ids for x in c]
    assert [x.finish for x in a] == [x.finish for x in b]
    np.testing.assert_allclose([x.score for x in a], [x.score for x in b], atol=1e-5)
    np.testing.assert_allclose([x.score for x in a], [x.score for x in c], atol=1e-5)
  # Alone, prompts of 2 to 4 tokens with BOS (P = 8) share a compilation; 11 tokens need P = 16.
  assert compiled[1] == compiled[0] and compiled[3] == compiled[2] <= compiled[0] + 1


def test_sharded_beam_search_equals_one_device(params16):
  mesh = part.make_mesh(num_expert_partitions=2, num_model_partitions=2)  # (2, 2, 2)
  kw = dict(max_new_tokens=4, num_beams=3, eos_id=EOS16, all_beams=True)
  want = decoding.beam_search(params16, CFG16, PROMPTS16, **kw)
  got = decoding.beam_search(params16, CFG16, PROMPTS16, mesh=mesh, **kw)
  assert [[x.ids for x in g] for g in got] == [[x.ids for x in w] for w in want]
  np.testing.assert_allclose([[x.score for x in g] for g in got],
                             [[x.score for x in w] for w in want], atol=1e-5)


def test_beam_search_bad_arguments():
  with pytest.raises(ValueError, match="num_beams"):
    decoding.beam_search({}, CFG, [[1]], max_new_tokens=2, num_beams=0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.beam_search({}, CFG, [[1]], max_new_tokens=0)
  assert decoding.beam_search({}, CFG, [], max_new_tokens=2) == []
  assert decoding.brevity_penalty(0.0, 7) == 1.0 and decoding.brevity_penalty(1.0, 7) == 2.0
