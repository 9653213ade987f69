"""UL2 mixture of denoisers and full-LM as seqio preprocessors (tf.data), OpenMoE settings.

OpenMoE (arXiv:2402.01739 §3; XueFuzhao/text-to-text-transfer-transformer
`t5/data/preprocessors.py::ul2_objective`) trains on six denoisers: span corruption with (mean
span, noise density) = (3, .15), (8, .15) under mode "[NLU] ", (3, .5), (8, .5), (64, .5) under "[NLG] ", at 10% each,
and prefix LM under "[S2S] " at 50%. Span corruption replaces each noise span of the inputs by a
unique sentinel (vocab_size - 1, vocab_size - 2, ...) and the targets list each sentinel followed
by its span. The mode prefix is text, tokenized and prepended to the inputs; inputs and targets
each end in EOS (`seqio.preprocessors.append_eos_after_trim` after these preprocessors).

Pipeline per task: a random aligned 65536-token segment per document -> concatenate 128
documents -> cut into chunks whose lengths follow a seeded i.i.d. choice of denoiser per chunk
(so each denoiser's share of the output examples is its rate, also for finite splits) -> denoise.
The chunk length of each denoiser is the longest one whose inputs and targets fit the task
feature lengths. All randomness is stateless and seeded by seqio's map seeds, so a dataset is a
fixed function of `get_dataset(seed=...)`.
"""
import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

MAX_CHUNK_TOKENS = 65536
CONCAT_DOCUMENTS = 128


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser: span corruption (mean_span set) or prefix LM (mean_span None)."""
  rate: float
  noise_density: float
  mode: str
  mean_span: Optional[float] = None

  @property
  def is_prefix_lm(self) -> bool:
    return self.mean_span is None


OPENMOE_DENOISERS = (
    Denoiser(0.1, 0.15, "[NLU] ", 3.0),
    Denoiser(0.1, 0.15, "[NLU] ", 8.0),
    Denoiser(0.1, 0.5, "[NLG] ", 3.0),
    Denoiser(0.1, 0.5, "[NLG] ", 8.0),
    Denoiser(0.1, 0.5, "[NLG] ", 64.0),
    Denoiser(0.5, 0.5, "[S2S] "),
)


# --------------------------------------------------------------------------- length arithmetic
def num_noise_and_spans(length: int, noise_density: float, mean_span: float):
  """(noise tokens, noise spans) that `random_spans_noise_mask` uses for `length` tokens."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def span_chunk_length(inputs_length: int, targets_length: int, denoiser: Denoiser,
                      prefix_length: int = 0) -> int:
  """Longest chunk whose corrupted inputs (+prefix, +EOS) and targets (+EOS) fit."""
  for length in range(inputs_length + targets_length, 1, -1):
    noise, spans = num_noise_and_spans(length, denoiser.noise_density, denoiser.mean_span)
    if (length - noise + spans + prefix_length + 1 <= inputs_length
        and noise + spans + 1 <= targets_length):
      return length
  raise ValueError(f"feature lengths inputs={inputs_length}, targets={targets_length} are too "
                   f"short for {denoiser} with a {prefix_length}-token mode prefix")


def prefix_lm_chunk_length(inputs_length: int, targets_length: int, prefix_length: int) -> int:
  """Chunk length L such that every split point in [1, L-1] fits both features (+EOS each)."""
  length = min(inputs_length - prefix_length, targets_length)
  if length < 2:
    raise ValueError(f"inputs length {inputs_length} leaves no room after a "
                     f"{prefix_length}-token mode prefix")
  return length


# --------------------------------------------------------------------------- noise masks
def random_segmentation(num_items, num_segments, seed):
  """Random composition of `num_items` into `num_segments` positive parts, int32[num_segments].

  The cut points are the first `num_segments - 1` entries of a seeded random permutation of
  the `num_items - 1` gaps, so every composition is equally likely.
  """
  scores = tf.random.stateless_uniform([num_items - 1], seed=seed)
  cuts = tf.sort(tf.argsort(scores)[:num_segments - 1] + 1)
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, noise_density, mean_span, seeds):
  """bool[length]: alternating non-noise / noise spans, starting with non-noise.

  Args:
    length: int32 scalar, number of tokens (>= 2).
    noise_density: float scalar, fraction of tokens that are noise.
    mean_span: float scalar, mean noise span length.
    seeds: two stateless seeds (int[2] each).
  """
  length = tf.cast(length, tf.int32)
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.maximum(tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_span), tf.int32),
                         1)
  num_spans = tf.minimum(num_spans, tf.minimum(num_noise, length - num_noise))
  noise_lengths = random_segmentation(num_noise, num_spans, seeds[0])
  keep_lengths = random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
  span_starts = tf.cumsum(span_lengths)[:-1]
  start_marks = tf.scatter_nd(span_starts[:, None], tf.ones_like(span_starts), [length])
  return tf.math.floormod(tf.cumsum(start_marks), 2) == 1


def replace_spans_with_sentinels(tokens, mask, first_sentinel):
  """Drops the `mask` tokens, putting one sentinel per masked span where the span began.

  The i-th masked span gets id `first_sentinel - i` (seqio's reversed extra ids).
  """
  previous = tf.concat([[False], mask[:-1]], axis=0)
  span_starts = tf.logical_and(mask, tf.logical_not(previous))
  sentinels = first_sentinel - (tf.cumsum(tf.cast(span_starts, tokens.dtype)) - 1)
  tokens = tf.where(span_starts, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_or(tf.logical_not(mask), span_starts))


def span_corruption(tokens, noise_density, mean_span, first_sentinel, seeds):
  """(inputs, targets) of T5-style span corruption with unique sentinels."""
  mask = random_spans_noise_mask(tf.size(tokens), noise_density, mean_span, seeds)
  inputs = replace_spans_with_sentinels(tokens, mask, first_sentinel)
  # A chunk starts with non-noise, so non-noise span i precedes noise span i: replacing the
  # non-noise spans gives "<X0> noise0 <X1> noise1 ...".
  targets = replace_spans_with_sentinels(tokens, tf.logical_not(mask), first_sentinel)
  return inputs, targets


def prefix_lm_split(tokens, seed):
  """(prefix, suffix) at a split point drawn uniformly from [1, len - 1]."""
  split = tf.random.stateless_uniform([], seed=seed, minval=1,
                                      maxval=tf.maximum(tf.size(tokens), 2), dtype=tf.int32)
  return tokens[:split], tokens[split:]


# --------------------------------------------------------------------------- dataset stages
def select_random_chunk(dataset, max_tokens: int = MAX_CHUNK_TOKENS, key: str = "targets"):
  """Keeps `{key: tokens}` only: one of the document's aligned `max_tokens` segments, drawn
  uniformly (the last one may be shorter), as T5's `select_random_chunk` with
  uniform_random_start=False (XueFuzhao/text-to-text-transfer-transformer
  `t5/data/preprocessors.py`, same seed split)."""

  @seqio.map_over_dataset(num_seeds=1)
  def _chunk(ex, seed):
    tokens = ex[key]
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed))
    n = tf.shape(tokens)[0]
    segments = tf.cast(tf.math.ceil(tf.cast(n, tf.float32) / float(max_tokens)), tf.int32)
    start = max_tokens * tf.random.stateless_uniform([], maxval=segments, dtype=tf.int32,
                                                     seed=seeds[1])
    return {key: tokens[start:tf.minimum(start + max_tokens, n)]}

  return _chunk(dataset.filter(lambda ex: tf.size(ex[key]) > 0))


def concat_documents(dataset, num_documents: int = CONCAT_DOCUMENTS, key: str = "targets",
                     separator: Optional[int] = None):
  """Concatenates runs of `num_documents` token sequences (T5's reduce_concat_tokens)."""
  if separator is not None:
    dataset = dataset.map(lambda ex: {key: tf.concat([ex[key], [separator]], axis=0)})
  return dataset.ragged_batch(num_documents).map(lambda ex: {key: ex[key].flat_values})


def _unbatch_chunks(tokens, row_lengths, extra=None):
  """Dataset of consecutive slices of `tokens` with the given lengths (plus per-slice extras)."""
  ends = tf.cumsum(row_lengths)
  starts = ends - row_lengths
  extra = extra or {}

  def _slice(i):
    return {"targets": tokens[starts[i]:ends[i]], **{k: v[i] for k, v in extra.items()}}

  return tf.data.Dataset.range(tf.size(row_lengths, out_type=tf.int64)).map(_slice)


def split_fixed(dataset, length: int, key: str = "targets"):
  """Cuts each sequence into pieces of `length` tokens (the last one may be shorter)."""

  def _split(ex):
    n = tf.size(ex[key])
    num = (n + length - 1) // length
    row_lengths = tf.minimum(length, n - tf.range(num) * length)
    return _unbatch_chunks(ex[key], row_lengths)

  return dataset.flat_map(_split)


def split_by_denoiser(dataset, chunk_lengths: Sequence[int], rates: Sequence[float]):
  """Cuts sequences into chunks, each for a denoiser drawn i.i.d. with `rates`.

  Yields `{"targets": tokens, "denoiser": int32}`; chunk i has length chunk_lengths[denoiser]
  (the sequence's last chunk may be shorter; chunks under 2 tokens are dropped).
  """
  lengths = tf.constant(chunk_lengths, tf.int32)
  logits = tf.math.log(tf.constant([rates], tf.float32))
  shortest = min(chunk_lengths)

  @seqio.map_over_dataset(num_seeds=1)
  def _plan(ex, seed):
    n = tf.size(ex["targets"])
    choice = tf.random.stateless_categorical(logits, n // shortest + 1, seed=seed,
                                             dtype=tf.int32)[0]
    ends = tf.cumsum(tf.gather(lengths, choice))
    starts = ends - tf.gather(lengths, choice)
    used = starts < n
    return {"targets": ex["targets"], "denoiser": tf.boolean_mask(choice, used),
            "row_lengths": tf.boolean_mask(tf.minimum(ends, n) - starts, used)}

  chunks = _plan(dataset).flat_map(
      lambda ex: _unbatch_chunks(ex["targets"], ex["row_lengths"], {"denoiser": ex["denoiser"]}))
  return chunks.filter(lambda ex: tf.size(ex["targets"]) >= 2)


def _mode_prefixes(vocabulary, denoisers, use_mode_prefixes):
  if not use_mode_prefixes:
    return [[] for _ in denoisers]
  return [list(vocabulary.encode(d.mode)) for d in denoisers]


def check_sentinel_budget(vocabulary, denoisers, chunk_lengths) -> None:
  """Raises if a chunk could need more sentinels than the vocabulary has extra ids."""
  for d, length in zip(denoisers, chunk_lengths):
    if d.is_prefix_lm:
      continue
    _, spans = num_noise_and_spans(length, d.noise_density, d.mean_span)
    if spans > vocabulary.extra_ids:
      raise ValueError(f"{d} on {length}-token chunks needs {spans} sentinels but the "
                       f"vocabulary has {vocabulary.extra_ids} extra ids; shorten the inputs")


def ul2_objective(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                  output_features: Mapping[str, seqio.Feature],
                  denoisers: Sequence[Denoiser] = OPENMOE_DENOISERS,
                  use_mode_prefixes: bool = True, max_chunk_tokens: int = MAX_CHUNK_TOKENS,
                  concat_documents_count: int = CONCAT_DOCUMENTS,
                  keep_denoiser_id: bool = False) -> tf.data.Dataset:
  """seqio preprocessor: tokenized `{"targets"}` documents -> UL2 `{"inputs", "targets"}`.

  Args:
    dataset: examples with an int32 `targets` token sequence.
    sequence_length: task feature lengths, `inputs` and `targets`.
    output_features: seqio features; the `targets` vocabulary supplies sentinels and prefixes.
    denoisers: the mixture of denoisers; rates must sum to 1.
    use_mode_prefixes: prepend the tokenized mode text to the inputs.
    max_chunk_tokens: random window per document.
    concat_documents_count: documents concatenated before chunking.
    keep_denoiser_id: also output int32 `denoiser` (index into `denoisers`), for tests and
      inspection; it is not a model feature.

  Returns:
    Examples `{"inputs", "targets"}` without EOS (appended after trimming by seqio).
  """
  if abs(sum(d.rate for d in denoisers) - 1.0) > 1e-6:
    raise ValueError(f"denoiser rates must sum to 1, got {[d.rate for d in denoisers]}")
  vocab = output_features["targets"].vocabulary
  inputs_length, targets_length = sequence_length["inputs"], sequence_length["targets"]
  prefixes = _mode_prefixes(vocab, denoisers, use_mode_prefixes)
  chunk_lengths = [
      prefix_lm_chunk_length(inputs_length, targets_length, len(p)) if d.is_prefix_lm else
      span_chunk_length(inputs_length, targets_length, d, len(p))
      for d, p in zip(denoisers, prefixes)]
  check_sentinel_budget(vocab, denoisers, chunk_lengths)

  ds = select_random_chunk(dataset, max_chunk_tokens)
  ds = concat_documents(ds, concat_documents_count)
  ds = split_by_denoiser(ds, chunk_lengths, [d.rate for d in denoisers])
  denoise = functools.partial(
      _denoise, denoisers=denoisers, prefixes=prefixes, first_sentinel=vocab.vocab_size - 1,
      keep_denoiser_id=keep_denoiser_id)
  return seqio.map_over_dataset(denoise, num_seeds=2)(ds)


def _denoise(ex, seeds, denoisers, prefixes, first_sentinel, keep_denoiser_id):
  """Applies denoiser `ex["denoiser"]` to `ex["targets"]` and prepends its mode prefix."""
  tokens, which = ex["targets"], ex["denoiser"]

  def _span(d):
    return lambda: span_corruption(tokens, d.noise_density, d.mean_span, first_sentinel, seeds)

  def _prefix_lm():
    return prefix_lm_split(tokens, seeds[0])

  branches = [_prefix_lm if d.is_prefix_lm else _span(d) for d in denoisers]
  inputs, targets = tf.switch_case(which, branches)
  prefix = tf.gather(tf.ragged.constant(prefixes, dtype=tokens.dtype, ragged_rank=1), which)
  out = {"inputs": tf.concat([prefix, inputs], axis=0), "targets": targets}
  if keep_denoiser_id:
    out["denoiser"] = which
  return out


def full_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
            output_features: Mapping[str, seqio.Feature],
            max_chunk_tokens: int = MAX_CHUNK_TOKENS,
            concat_documents_count: int = CONCAT_DOCUMENTS) -> tf.data.Dataset:
  """seqio preprocessor: documents joined with EOS, cut into `targets`-length rows.

  Rows are exactly `sequence_length["targets"]` tokens except the last of each concatenated
  group, which the packing feature converter combines with others.
  """
  eos = output_features["targets"].vocabulary.eos_id
  ds = select_random_chunk(dataset, max_chunk_tokens)
  ds = concat_documents(ds, concat_documents_count, separator=eos)
  return split_fixed(ds, sequence_length["targets"])
