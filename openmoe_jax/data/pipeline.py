"""Training batches from a seqio task or mixture: packed, per-host sharded, deterministic, resumable.

`make_iterator(...)` gives a `DataIterator` of numpy batches with the decoder-only features of
seqio's `DecoderFeatureConverter(pack=True)` (PrefixLM conversion when the task has `inputs`):

  decoder_target_tokens, decoder_input_tokens, decoder_loss_weights, decoder_segment_ids,
  decoder_positions: int32[per_host_batch, inputs_length + targets_length] (UL2) or
  int32[per_host_batch, targets_length] (full LM).

Loss weights are 1 on targets only. `decoder_causal_attention` is dropped: OpenMoE attends
causally everywhere (XueFuzhao/flaxformer `moe_decoder_only.gin`: no bidirectional prefix). Each host reads its own shard (`seqio.ShardInfo`, default
jax.process_index() of jax.process_count()). For a seed the stream is fixed; `get_state()`
returns `{seed, batches_consumed, ...}` (JSON) and `save_position()` the tf.data iterator's own
saved state (bytes) when the pipeline can save one. `set_state(state, position)` restores that
position, which costs the same at any step; without one (a pipeline reading a Python generator
cannot be saved) it rebuilds the pipeline and replays it to the saved batch. Either way a resumed
run sees exactly the batches an uninterrupted run would (see benchmarks/RESULTS.md for the cost).
seqio and TensorFlow are imported on first use (~5 s).
"""
import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np

from openmoe_jax.data import corpus
from openmoe_jax.errors import UsageError, UsageValueError, error_line
from openmoe_jax.training.checkpoint import allgather_json

BATCH_KEYS = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions")
STATE_VERSION = 1
# The data seed of every held-out evaluation (the training loop's and openmoe-eval's): the
# held-out examples do not change with train.seed.
EVAL_SEED = 0
_SHARD_SEED_STRIDE = 1_000_003  # keeps per-host seeds distinct for any seed < 2**40


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read. `batch_size` is global: each of `num_shards` hosts gets an equal slice.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture (import `tasks` first).
    task_feature_lengths: e.g. {"inputs": 1024, "targets": 1024} (UL2) or {"targets": 2048}.
    batch_size: global number of packed rows per step.
    split: dataset split.
    seed: fixes shuffling, mixing and every random preprocessing choice.
    shuffle: shuffle files and examples.
    num_epochs: None repeats forever (training); 1 for a single pass.
    pack: pack several examples per row (OpenMoE: True).
    drop_remainder: drop a final partial batch (static shapes for jit).
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None
  pack: bool = True
  drop_remainder: bool = True


def default_shard() -> tuple:
  """(index, count) of this host: jax.process_index() / jax.process_count()."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def registered_names() -> list:
  """Sorted names of every registered seqio task and mixture."""
  import seqio  # pylint: disable=g-import-not-at-top
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_provider(name: str):
  """The registered task or mixture `name`.

  Raises:
    ValueError: unknown name; the message lists the registered ones.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  names = registered_names()
  if name not in names:
    raise ValueError(f"unknown task or mixture {name!r} (did you import tasks?); "
                     f"registered: {', '.join(names) or 'none'}")
  return seqio.get_mixture_or_task(name)


def check_sources(name: str, split: str = "train") -> None:
  """Resolves the data files and vocabularies of every task of `name` that has `split`, now.

  Missing data or a missing tokenizer then fails here, in Python, before any training state
  exists, rather than inside the tf.data pipeline (where TensorFlow rewraps the error).

  Raises:
    ValueError: unknown name (see `get_provider`); the sources' and vocabularies' own errors
      (e.g. FileNotFoundError for missing data).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  provider = get_provider(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    if split not in task.splits:
      continue
    task.source.list_shards(split)
    for feature in task.output_features.values():
      _ = feature.vocabulary.vocab_size  # loads the SentencePiece model


def check_features(name: str, task_feature_lengths: Mapping[str, int], vocab_size: int) -> None:
  """Checks, before any pipeline runs, that the lengths and the embedding fit the task.

  Raises:
    ValueError: a required feature of the task without a length, a length that is not a positive integer, or a vocabulary with more ids than
      the model's embedding rows (ids past the table would train into NaN or garbage).
  """
  provider = get_provider(name)
  features = provider.output_features
  missing = [k for k, f in features.items() if f.required and k not in task_feature_lengths]
  if missing:
    example = ", ".join(f"'{k}': {task_feature_lengths.get(k, 1024)}" for k in features)
    raise ValueError(f"TASK_FEATURE_LENGTHS has no length for {', '.join(map(repr, missing))}, "
                     f"which {name} produces (e.g. {{{example}}})")
  for k, v in task_feature_lengths.items():
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"TASK_FEATURE_LENGTHS[{k!r}] = {v!r}: must be a positive integer")
  for k, feature in features.items():
    n = feature.vocabulary.vocab_size
    if n > vocab_size:
      raise ValueError(f"the vocabulary of {name}'s {k!r} has {n} ids but the model has "
                       f"NUM_EMBEDDINGS = {vocab_size} rows; set NUM_EMBEDDINGS >= {n} "
                       "(OpenMoE pads to a multiple of 128)")


def build_dataset(config: DataConfig, shard_index: int = 0, num_shards: int = 1):
  """The per-host tf.data pipeline: seqio dataset -> packed features -> batches.

  Args:
    config: what to read.
    shard_index: this host's shard.
    num_shards: number of hosts; must divide `config.batch_size`.

  Returns:
    tf.data.Dataset of dicts of int32[batch_size // num_shards, length] tensors.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config.batch_size % num_shards:
    raise ValueError(f"global batch {config.batch_size} is not divisible by {num_shards} hosts")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard index {shard_index} out of range for {num_shards} shards")
  get_provider(config.mixture_or_task_name)
  shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  # Hosts share the base seed but must not make identical random choices on their shards.
  seed = config.seed + _SHARD_SEED_STRIDE * shard_index
  converter = seqio.DecoderFeatureConverter(pack=config.pack)
  ds = seqio.get_dataset(
      config.mixture_or_task_name, task_feature_lengths=dict(config.task_feature_lengths),
      feature_converter=converter, dataset_split=config.split, use_cached=False,
      shuffle=config.shuffle, num_epochs=config.num_epochs, shard_info=shard_info, seed=seed)
  ds = ds.map(lambda ex: {k: ex[k] for k in BATCH_KEYS}, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(config.batch_size // num_shards, drop_remainder=config.drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  # The Python calls in the sources are pure functions of their inputs (a document of a file),
  # so the iterator's position is all there is to save (a Python generator still refuses).
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class DataStateMismatchError(UsageValueError):
  """A saved data position that belongs to another pipeline (a user error: exit code 2)."""


class DataIterator:
  """Iterator of numpy batches (dict of int32 arrays, keys `BATCH_KEYS`) with exact resume."""

  # Why `save_position` returns None (the pipeline cannot save its position).
  unsaveable_reason: Optional[str] = None
  # Why a resume replayed the stream although a saved position was given.
  restore_failure: Optional[str] = None

  def __init__(self, config: DataConfig, shard_index: Optional[int] = None,
               num_shards: Optional[int] = None):
    if (shard_index is None) != (num_shards is None):
      raise ValueError("give both shard_index and num_shards, or neither")
    if shard_index is None:
      shard_index, num_shards = default_shard()
    self.config = config
    self.shard_index = shard_index
    self.num_shards = num_shards
    self._consumed = 0
    self._iterator: Optional[Iterator] = None
    self._position: Optional[bytes] = None  # a saved tf.data position to restore on start
    self.resumed_by: Optional[str] = None  # 'position' or 'replay' after a resume

  def _start(self) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ds = build_dataset(self.config, self.shard_index, self.num_shards)
    position, self._position = self._position, None
    if position is not None:
      iterator = iter(ds)
      try:
        iterator._restore(tf.constant(position))  # pylint: disable=protected-access
        self._iterator, self.resumed_by = iterator, "position"
        return
      except tf.errors.OpError as e:
        # The error text embeds the whole serialized state: its first words say enough.
        why = error_line(e).split("{{")[0].strip()
        self.restore_failure = f"the saved position did not restore ({why[:160]})"
        # A dataset iterated once already draws another shuffle order on its next iteration:
        # the replay starts from a fresh one, whose first iteration is the saved run's stream.
        ds = build_dataset(self.config, self.shard_index, self.num_shards)
    if self._consumed:
      # Exact resume: replay the deterministic stream up to where the saved run stopped.
      ds = ds.skip(self._consumed)
      self.resumed_by = "replay"
    self._iterator = iter(ds)

  def save_position(self) -> Optional[bytes]:
    """The tf.data iterator's saved state at this point of the stream (bytes), or None when the
    pipeline cannot save one (a Python-generator source; `unsaveable_reason` says why)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.unsaveable_reason is not None:
      return None
    if self._iterator is None:
      self._start()
    try:
      return self._iterator._save().numpy()  # pylint: disable=protected-access
    except tf.errors.OpError as e:
      self.unsaveable_reason = error_line(e).split("}}")[-1].strip()
      return None

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    self._consumed += 1
    return batch

  @property
  def batches_consumed(self) -> int:
    return self._consumed

  def get_state(self) -> Dict[str, Any]:
    """JSON-serialisable position: the config, this host's shard and the batches consumed."""
    return {"version": STATE_VERSION, "batches_consumed": self._consumed,
            "shard_index": self.shard_index, "num_shards": self.num_shards,
            **_config_state(self.config)}

  def set_state(self, state: Mapping[str, Any], position: Optional[bytes] = None) -> None:
    """Continues from `state` (from `get_state`); the next batch is batch `batches_consumed`.

    `position` (from `save_position` at the same point) restores the pipeline in constant time;
    without it the stream is replayed from its start.

    Raises:
      DataStateMismatchError: the state belongs to another pipeline (name, lengths, batch,
        split, shards); a different seed is adopted from the state, since it defines the stream.
    """
    if state.get("version") != STATE_VERSION:
      raise DataStateMismatchError(f"unsupported data state version {state.get('version')}")
    mine = {**_config_state(self.config), "shard_index": self.shard_index,
            "num_shards": self.num_shards}
    diff = {k: (state.get(k), v) for k, v in mine.items() if k != "seed" and state.get(k) != v}
    if diff:
      raise DataStateMismatchError(
          f"data state does not match this iterator (saved, current): {diff}")
    self.config = dataclasses.replace(self.config, seed=int(state["seed"]))
    self._consumed = int(state["batches_consumed"])
    self._iterator = None
    self._position = position
    if position is not None:
      self._start()  # now, so a position that does not restore falls back to replay here


def _config_state(config: DataConfig) -> Dict[str, Any]:
  state = dataclasses.asdict(config)
  state["task_feature_lengths"] = dict(sorted(config.task_feature_lengths.items()))
  return state


def make_iterator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  batch_size: int, *, split: str = "train", seed: int = 0,
                  shuffle: bool = True, num_epochs: Optional[int] = None, pack: bool = True,
                  shard_index: Optional[int] = None,
                  num_shards: Optional[int] = None) -> DataIterator:
  """Convenience constructor of `DataIterator(DataConfig(...), shard_index, num_shards)`."""
  config = DataConfig(mixture_or_task_name, dict(task_feature_lengths), batch_size, split=split,
                      seed=seed, shuffle=shuffle, num_epochs=num_epochs, pack=pack)
  return DataIterator(config, shard_index, num_shards)


def to_global_arrays(batch: Mapping[str, np.ndarray], sharding) -> Dict[str, Any]:
  """Per-host numpy batch -> global jax.Arrays laid out by `sharding` (batch axis first).

  Args:
    batch: this host's rows, as returned by `DataIterator`.
    sharding: a `jax.sharding.Sharding` for the global [batch, length] arrays, e.g.
      NamedSharding(mesh, P(("data", "expert"), None)).
  """
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class ShardedIterator:
  """This process's share of `num_data_shards` seqio shards, rows concatenated in shard order.

  With one shard per process this is the plain per-host iterator. A single process reading
  all shards of a multi-host run sees the same global batches, which is how multi-host runs
  are checked against single-host ones.
  """

  def __init__(self, num_data_shards: Optional[int], **kwargs):
    import jax  # pylint: disable=g-import-not-at-top
    n, p, i = num_data_shards or jax.process_count(), jax.process_count(), jax.process_index()
    if n % p:
      raise UsageError(f"num_data_shards={n} must be a multiple of the process count {p}")
    per = n // p
    batch = kwargs.pop("batch_size")
    self._first = None
    self._its = [make_iterator(batch_size=batch, shard_index=i * per + j, num_shards=n,
                                        **kwargs) for j in range(per)]

  def __iter__(self):
    return self

  def __next__(self):
    if self._first is not None:
      batch, self._first = self._first, None
      return batch
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

  def check_first_batch(self, name: str, lengths) -> None:
    """Makes the first batch now, so a task / length mismatch fails before anything is written
    (it becomes the next batch; `set_state` drops it)."""
    try:
      self._first = next(self)
    except StopIteration:
      skipped = {k: v for k, v in corpus.skipped_document_counts().items() if v}
      said = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
      raise UsageError(f"{name} gives no training example: its source is empty or every "
                       f"document was skipped ({said or 'none read'}; 'missing field': JSON "
                       "lines without the field the task reads)") from None
    except KeyError as e:
      raise UsageError(f"TASK_FEATURE_LENGTHS {dict(lengths)} has no length for {e}, which "
                       f"{name} produces (a UL2 task needs 'inputs' and 'targets')") from None
    except Exception as e:  # pylint: disable=broad-except  (the data pipeline's own errors)
      raise UsageError(f"the first batch of {name} could not be made: {type(e).__name__}: "
                       f"{error_line(e)}") from None

  @property
  def shard_indices(self) -> list:
    """The data shards this process reads."""
    return [it.shard_index for it in self._its]

  def get_state(self):
    """The position of every shard of every process, `{"shards": [...]}` in shard order.

    Collective in multi-process runs (every process calls it), because the checkpoint's data
    item is written by process 0 alone.
    """
    return {"shards": self._gather([it.get_state() for it in self._its])}

  @staticmethod
  def _gather(mine: list) -> list:
    """Every process's shard states, in shard order (collective)."""
    return sorted((s for part in allgather_json(mine) for s in part),
                  key=lambda s: s["shard_index"])

  def checkpoint_items(self):
    """(`get_state()`, {shard index: saved tf.data position} of this process's shards or None).

    The positions are None on every process alike when any shard's pipeline cannot save one
    (collective, like `get_state`).
    """
    positions = {it.shard_index: it.save_position() for it in self._its}
    shards = self._gather([{**it.get_state(), "position_saved": positions[it.shard_index] is not None}
                           for it in self._its])
    saved = all(s.pop("position_saved") for s in shards)
    return {"shards": shards}, (positions if saved else None)

  @property
  def unsaveable_reason(self) -> Optional[str]:
    return next((it.unsaveable_reason for it in self._its if it.unsaveable_reason), None)

  def set_state(self, state, positions: Optional[Mapping[int, bytes]] = None) -> str:
    """Continues each of this process's shards from the saved shard with its index; returns a
    line saying how (restored position, or replay and why)."""
    self._first = None
    saved = {s.get("shard_index"): s for s in state["shards"]}
    positions = positions or {}
    for it in self._its:
      # No saved shard with this index: the shard count changed, which set_state reports.
      it.set_state(saved.get(it.shard_index, state["shards"][0]), positions.get(it.shard_index))
    consumed = self._its[0].batches_consumed
    if all(it.resumed_by == "position" for it in self._its):
      return f"input restored at batch {consumed} from the saved pipeline position"
    why = next((it.restore_failure for it in self._its if it.restore_failure), None) or (
        "the checkpoint holds no pipeline position (its input pipeline could not save one, "
        "e.g. a source that reads a Python generator)")
    return f"input replayed to batch {consumed} (takes as long as reading them): {why}"
