"""UL2 / full-LM preprocessors on synthetic token streams: statistics, reconstruction, lengths."""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from openmoe_jax.data import ul2  # noqa: E402
from openmoe_jax.data import vocab as vocab_lib  # noqa: E402

LENGTHS = {"inputs": 128, "targets": 128}


@pytest.fixture(scope="module")
def vocabulary():
  return vocab_lib.builtin_vocabulary()


@pytest.fixture(scope="module")
def features(vocabulary):
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def _docs(num_docs, seed=0, max_len=1500):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, 7000, size=rng.randint(20, max_len)).astype(np.int32)
          for _ in range(num_docs)]


def _dataset(docs):
  return tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})


def _run_ul2(features, docs, seed=1, lengths=None, **kwargs):
  with seqio.utils.map_seed_manager(seed):
    ds = ul2.ul2_objective(_dataset(docs), lengths or LENGTHS, features, keep_denoiser_id=True,
                           **kwargs)
  return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def ul2_examples(features):
  return _run_ul2(features, _docs(1200))


def _prefix_lengths(vocabulary):
  return [len(vocabulary.encode(d.mode)) for d in ul2.OPENMOE_DENOISERS]


def test_denoiser_proportions_and_mode_prefixes(ul2_examples, vocabulary):
  which = np.array([ex["denoiser"] for ex in ul2_examples])
  assert len(which) > 4000
  shares = np.bincount(which, minlength=6) / len(which)
  np.testing.assert_allclose(shares, [d.rate for d in ul2.OPENMOE_DENOISERS], atol=0.02)
  for ex in ul2_examples[:300]:
    d = ul2.OPENMOE_DENOISERS[ex["denoiser"]]
    prefix = vocabulary.encode(d.mode)
    assert list(ex["inputs"][:len(prefix)]) == prefix


def test_noise_density_and_span_length_per_denoiser(features, vocabulary):
  # 512-token features: at 128 tokens, rounding the span count (e.g. 20 noise tokens / 8 ->
  # 2 spans) biases the mean span length by up to 25%, as in T5's implementation.
  ul2_examples = _run_ul2(features, _docs(400, seed=2, max_len=3000),
                          lengths={"inputs": 512, "targets": 512})
  assert min(np.bincount([ex["denoiser"] for ex in ul2_examples], minlength=6)) >= 15
  prefix_lengths = _prefix_lengths(vocabulary)
  first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids
  for k, d in enumerate(ul2.OPENMOE_DENOISERS):
    exs = [ex for ex in ul2_examples if ex["denoiser"] == k]
    if d.is_prefix_lm:
      total = sum(len(ex["inputs"]) - prefix_lengths[k] + len(ex["targets"]) for ex in exs)
      suffix = sum(len(ex["targets"]) for ex in exs)
      assert abs(suffix / total - d.noise_density) < 0.02
      continue
    spans = sum(int((ex["targets"] >= first_sentinel).sum()) for ex in exs)
    noise = sum(len(ex["targets"]) for ex in exs) - spans
    kept = sum(len(ex["inputs"]) - prefix_lengths[k] for ex in exs) - spans
    assert abs(noise / (noise + kept) / d.noise_density - 1) < 0.02, (d, noise, kept)
    assert abs(noise / spans / d.mean_span - 1) < 0.10, (d, noise, spans)


def _reconstruct(inputs, targets, first_sentinel):
  """Substitutes each sentinel of `inputs` by the span that follows it in `targets`."""
  spans, current = {}, None
  for t in targets:
    if t >= first_sentinel:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out.extend(spans.pop(t) if t >= first_sentinel else [t])
  assert not spans, "every target span must have a sentinel in the inputs"
  return out


def test_inputs_and_targets_reconstruct_the_stream(features, vocabulary):
  docs = _docs(60, seed=3)  # fewer than 128 documents: one concatenated sequence, in order
  examples = _run_ul2(features, docs, seed=5)
  first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids
  prefix_lengths = _prefix_lengths(vocabulary)
  rebuilt = []
  for ex in examples:
    inputs = list(ex["inputs"][prefix_lengths[ex["denoiser"]]:])
    targets = list(ex["targets"])
    if ul2.OPENMOE_DENOISERS[ex["denoiser"]].is_prefix_lm:
      rebuilt.extend(inputs + targets)
    else:
      sentinels = [t for t in inputs if t >= first_sentinel]
      # unique sentinels counting down from the top of the vocabulary, one per span
      assert sentinels == list(range(vocabulary.vocab_size - 1,
                                     vocabulary.vocab_size - 1 - len(sentinels), -1))
      rebuilt.extend(_reconstruct(inputs, targets, first_sentinel))
  stream = np.concatenate(docs)
  assert len(stream) - len(rebuilt) <= 1  # a 1-token tail chunk is dropped
  np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])


def test_examples_fit_feature_lengths_with_room_for_eos(ul2_examples):
  assert max(len(ex["inputs"]) for ex in ul2_examples) <= LENGTHS["inputs"] - 1
  assert max(len(ex["targets"]) for ex in ul2_examples) <= LENGTHS["targets"] - 1


def test_openmoe_lengths_fit_300_sentinels(vocabulary):
  for d in ul2.OPENMOE_DENOISERS:
    if d.is_prefix_lm:
      assert ul2.prefix_lm_chunk_length(1024, 1024, 6) == 1018
      continue
    length = ul2.span_chunk_length(1024, 1024, d, prefix_length=6)
    noise, spans = ul2.num_noise_and_spans(length, d.noise_density, d.mean_span)
    assert length - noise + spans + 7 <= 1024 and noise + spans + 1 <= 1024
    assert spans <= vocab_lib.OPENMOE_EXTRA_IDS
  ul2.check_sentinel_budget(vocabulary, ul2.OPENMOE_DENOISERS, [1534] * 6)
  with pytest.raises(ValueError, match="sentinels"):
    ul2.check_sentinel_budget(vocabulary, ul2.OPENMOE_DENOISERS, [4000] * 6)
  with pytest.raises(ValueError, match="too short"):
    ul2.span_chunk_length(3, 3, ul2.OPENMOE_DENOISERS[0], prefix_length=6)


def test_same_seed_same_examples_other_seed_differs(features):
  docs = _docs(40, seed=7)
  a, b, c = (_run_ul2(features, docs, seed=s) for s in (11, 11, 12))
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_full_lm_rows_join_documents_with_eos(features, vocabulary):
  docs = _docs(30, seed=9, max_len=300)
  with seqio.utils.map_seed_manager(0):
    rows = list(ul2.full_lm(_dataset(docs), {"targets": 64}, features).as_numpy_iterator())
  lengths = [len(r["targets"]) for r in rows]
  assert all(n == 64 for n in lengths[:-1]) and 0 < lengths[-1] <= 64
  expected = np.concatenate([np.append(d, vocabulary.eos_id) for d in docs])
  np.testing.assert_array_equal(np.concatenate([r["targets"] for r in rows]), expected)


def test_long_documents_are_cut_to_a_window(features):
  long_doc = np.arange(3, 5003, dtype=np.int32)
  with seqio.utils.map_seed_manager(0):
    rows = list(ul2.full_lm(_dataset([long_doc]), {"targets": 4096}, features,
                            max_chunk_tokens=1000).as_numpy_iterator())
  tokens = np.concatenate([r["targets"] for r in rows])
  assert len(tokens) == 1001  # window + EOS
  np.testing.assert_array_equal(np.diff(tokens[:-1]), 1)  # a contiguous window
  assert (tokens[0] - 3) % 1000 == 0  # one of T5's aligned segments, not a random offset


def test_chunks_are_aligned_segments_drawn_uniformly(features):
  """T5 select_random_chunk (uniform_random_start=False): segment k of ceil(n / max) starts at
  k * max; the last one is shorter."""
  doc = np.arange(3, 2503, dtype=np.int32)  # 2500 tokens: segments 0, 1000, 2000 (500 long)
  starts = {}
  for seed in range(40):
    with seqio.utils.map_seed_manager(seed):
      row = next(ul2.select_random_chunk(_dataset([doc]), 1000).as_numpy_iterator())["targets"]
    starts[int(row[0]) - 3] = len(row)
  assert starts == {0: 1000, 1000: 1000, 2000: 500}
