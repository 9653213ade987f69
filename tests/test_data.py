"""Training iterator: packed features, loss masks, determinism, exact resume, host sharding."""
import collections
import functools
import itertools
import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import tasks  # noqa: E402,F401  pylint: disable=unused-import
from openmoe_jax.data import pipeline as data  # noqa: E402
from openmoe_jax.data import ul2  # noqa: E402
from openmoe_jax.data import vocab as vocab_lib  # noqa: E402
from tasks import common  # noqa: E402

UL2 = {"inputs": 64, "targets": 64}
SHORT_TASK = "test_short_sentences_ul2"


def _short_sentences(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  texts = [f"Sentence {i} says that {i} times {i % 7} is {i * (i % 7)}." for i in range(200)]
  return tf.data.Dataset.from_tensor_slices({"text": texts})


def _register_short_task():
  """Short documents kept apart (no concatenation): several UL2 examples fit in one row."""
  if SHORT_TASK in seqio.TaskRegistry.names():
    return
  steps = common.preprocessors("ul2")
  steps[steps.index(ul2.ul2_objective)] = functools.partial(ul2.ul2_objective,
                                                            concat_documents_count=1)
  seqio.TaskRegistry.add(
      SHORT_TASK, seqio.FunctionDataSource(_short_sentences, splits=("validation",)),
      preprocessors=steps, output_features=common.output_features(
          vocab_lib.builtin_vocabulary()))


def _iterator(name="builtin_corpus_ul2", lengths=None, batch=4, **kwargs):
  kwargs.setdefault("split", "validation")
  kwargs.setdefault("shuffle", False)  # the seed still drives the UL2 noise
  return data.make_iterator(name, lengths or UL2, batch, shard_index=kwargs.pop("index", 0),
                            num_shards=kwargs.pop("shards", 1), **kwargs)


@pytest.fixture(scope="module")
def ul2_batches():
  _register_short_task()
  it = _iterator(seed=3)
  short = _iterator(SHORT_TASK, seed=3)
  return [next(it), next(it), next(short), next(short)]


def test_batch_keys_shapes_dtypes(ul2_batches):
  for b in ul2_batches:
    assert tuple(sorted(b)) == tuple(sorted(data.BATCH_KEYS))
    for v in b.values():
      assert v.shape == (4, 128) and v.dtype == np.int32


def _segments(row_segment_ids):
  ids = row_segment_ids[row_segment_ids > 0]
  return [s for s in np.unique(ids)]


def test_packing_keeps_segments_apart(ul2_batches):
  packed_rows = 0
  for b in ul2_batches:
    for r in range(4):
      seg, pos = b["decoder_segment_ids"][r], b["decoder_positions"][r]
      tgt, inp = b["decoder_target_tokens"][r], b["decoder_input_tokens"][r]
      nonpad = seg > 0
      assert (tgt[~nonpad] == 0).all() and (seg[nonpad] > 0).all()
      assert (np.diff(seg[nonpad]) >= 0).all() and (np.diff(seg[nonpad]) <= 1).all()
      segments = _segments(seg)
      packed_rows += len(segments) > 1
      for s in segments:
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all()                     # one contiguous run
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart
        assert inp[idx[0]] == 0                                # BOS = pad id at each start
        np.testing.assert_array_equal(inp[idx[1:]], tgt[idx[:-1]])    # no cross-segment input
  assert packed_rows > 0, "examples this short must be packed several to a row"


def test_loss_only_on_targets(ul2_batches):
  for b in ul2_batches:
    for r in range(4):
      seg, w, tgt = (b[k][r] for k in ("decoder_segment_ids", "decoder_loss_weights",
                                        "decoder_target_tokens"))
      assert (w[seg == 0] == 0).all()
      for s in _segments(seg):
        ws, ts = w[seg == s], tgt[seg == s]
        first = int(np.argmax(ws))
        # inputs (mode, text, sentinels, EOS) weigh 0, then targets (ending in EOS) weigh 1
        assert first > 0 and (ws[:first] == 0).all() and (ws[first:] == 1).all()
        assert ts[first - 1] == 1 and ts[-1] == 1


def test_same_seed_same_batches_other_seed_differs():
  a, b, c = _iterator(seed=5), _iterator(seed=5), _iterator(seed=6)
  for _ in range(2):
    x, y, z = next(a), next(b), next(c)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x[k], z[k]) for k in data.BATCH_KEYS)


def test_resume_sees_the_uninterrupted_batches():
  run = _iterator("builtin_mix", split="train", seed=11, batch=2, shuffle=True)
  for _ in range(3):
    next(run)
  state = json.loads(json.dumps(run.get_state()))
  assert state["batches_consumed"] == 3 and state["seed"] == 11
  expected = [next(run) for _ in range(2)]
  resumed = _iterator("builtin_mix", split="train", seed=0, batch=2, shuffle=True)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.get_state()["batches_consumed"] == 5


def test_saved_position_restores_the_uninterrupted_batches_without_replay():
  run = _iterator("builtin_mix", split="train", seed=11, batch=2, shuffle=True)
  for _ in range(3):
    next(run)
  state, position = json.loads(json.dumps(run.get_state())), run.save_position()
  assert isinstance(position, bytes) and run.unsaveable_reason is None
  expected = [next(run) for _ in range(2)]
  resumed = _iterator("builtin_mix", split="train", seed=11, batch=2, shuffle=True)
  resumed.set_state(state, position)
  assert resumed.resumed_by == "position"  # restored, not replayed
  for want in expected:
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.get_state()["batches_consumed"] == 5


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_position_replays_exactly_and_says_why_in_one_short_line(damage):
  """A saved position that does not restore falls back to replay, and the replay is the
  uninterrupted stream (a dataset iterated once for the failed restore would reshuffle)."""
  run = _iterator("builtin_mix", split="train", seed=11, batch=2, shuffle=True)
  for _ in range(3):
    next(run)
  state, position = json.loads(json.dumps(run.get_state())), run.save_position()
  expected = [next(run) for _ in range(3)]
  bad = position[:len(position) // 2] if damage == "truncated" else b"\x07" * len(position)
  resumed = _iterator("builtin_mix", split="train", seed=11, batch=2, shuffle=True)
  resumed.set_state(state, bad)
  assert resumed.resumed_by == "replay"
  assert resumed.restore_failure.startswith("the saved position did not restore (")
  assert len(resumed.restore_failure) < 250 and "\n" not in resumed.restore_failure
  for want in expected:
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


GENERATOR_TASK = "test_generator_source_full_lm"


def _generator_sentences(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Endless: a generator that has run out can be saved (its state is "done"), and the
  # pipeline's prefetching could exhaust a short one before the save.
  texts = lambda: (f"Generated sentence {i} of a Python generator." for i in itertools.count())
  return tf.data.Dataset.from_generator(
      texts, output_signature=tf.TensorSpec([], tf.string)).map(lambda t: {"text": t})


def test_a_python_generator_source_cannot_save_and_replays_exactly():
  if GENERATOR_TASK not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        GENERATOR_TASK, seqio.FunctionDataSource(_generator_sentences, splits=("validation",)),
        preprocessors=common.preprocessors("full_lm"),
        output_features=common.output_features(vocab_lib.builtin_vocabulary()))
  make = lambda: data.ShardedIterator(1, mixture_or_task_name=GENERATOR_TASK,
                                      task_feature_lengths={"targets": 32}, batch_size=2,
                                      split="validation", shuffle=False)
  run = make()
  next(run)
  state, positions = run.checkpoint_items()
  assert positions is None and "GeneratorDataset" in run.unsaveable_reason
  expected = next(run)
  resumed = make()
  note = resumed.set_state(state, positions)
  assert note.startswith("input replayed to batch 1 ")
  np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"],
                                expected["decoder_target_tokens"])


def test_set_state_rejects_another_pipeline():
  state = _iterator().get_state()
  with pytest.raises(ValueError, match="batch_size"):
    _iterator(batch=8).set_state(state)
  with pytest.raises(ValueError, match="num_shards"):
    _iterator(index=0, shards=2).set_state(state)


def _token_counts(index, shards):
  config = data.DataConfig("builtin_corpus_full_lm", {"targets": 128}, batch_size=4,
                           split="validation", shuffle=False, num_epochs=1,
                           drop_remainder=False)
  counts = collections.Counter()
  for b in data.DataIterator(config, index, shards):
    counts.update(b["decoder_target_tokens"][b["decoder_segment_ids"] > 0].tolist())
  return counts


def test_host_shards_are_disjoint_and_cover_the_data():
  whole = _token_counts(0, 1)
  parts = [_token_counts(i, 2) for i in range(2)]
  assert parts[0] != parts[1]
  assert parts[0] + parts[1] == whole  # every document's tokens exactly once over the hosts


def test_unknown_name_lists_registered_names():
  with pytest.raises(ValueError, match="registered: .*builtin_mix.*mix_ul2"):
    next(_iterator("no_such_mixture"))


def test_global_arrays_on_fake_devices(ul2_batches):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4, 2), ("data", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  arrays = data.to_global_arrays(ul2_batches[0], NamedSharding(mesh, P("data")))
  assert arrays["decoder_target_tokens"].shape == (4, 128)
  np.testing.assert_array_equal(np.asarray(arrays["decoder_positions"]),
                                ul2_batches[0]["decoder_positions"])
