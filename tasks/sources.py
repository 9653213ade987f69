"""seqio data sources: document files (JSONL / parquet / text), the stdlib corpus, TFDS.

Where OpenMoE's data lives is configured, never assumed (gin, or the env vars named below):

  tasks.sources.data_dirs.tfds_data_dir = %TFDS_DATA_DIR    # $OPENMOE_TFDS_DATA_DIR
  tasks.sources.data_dirs.redpajama_dir = %REDPAJAMA_DIR    # $OPENMOE_REDPAJAMA_DIR
  tasks.sources.data_dirs.the_stack_dir = %THE_STACK_DIR    # $OPENMOE_THE_STACK_DIR
  tasks.sources.data_dirs.wikipedia_dir = %WIKIPEDIA_DIR    # $OPENMOE_WIKIPEDIA_DIR

A subset is read from raw files when its directory is configured, else from the TFDS builder
OpenMoE used when the TFDS data dir holds it; otherwise `get_dataset` fails naming every path it
looked for. Nothing is resolved before a dataset is requested.

Every document passes `corpus.clean_document`: empty and invalid-UTF-8 documents are skipped,
very long ones truncated, and all three counted in `SOURCE_STATS[source_name]`.
"""
import dataclasses
import glob
import gzip
import io
import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from openmoe_jax.data import corpus
from openmoe_jax.gin_utils import UsageFileNotFoundError

SOURCE_STATS = corpus.SOURCE_STATS  # one registry: the training loop reports these counts
_ENV = {"tfds_data_dir": "OPENMOE_TFDS_DATA_DIR", "redpajama_dir": "OPENMOE_REDPAJAMA_DIR",
        "the_stack_dir": "OPENMOE_THE_STACK_DIR", "wikipedia_dir": "OPENMOE_WIKIPEDIA_DIR"}


@dataclasses.dataclass(frozen=True)
class DataDirs:
  tfds_data_dir: Optional[str] = None
  redpajama_dir: Optional[str] = None
  the_stack_dir: Optional[str] = None
  wikipedia_dir: Optional[str] = None


@gin.configurable(module="tasks.sources")
def data_dirs(tfds_data_dir: Optional[str] = None, redpajama_dir: Optional[str] = None,
              the_stack_dir: Optional[str] = None,
              wikipedia_dir: Optional[str] = None) -> DataDirs:
  """Source locations: gin bindings first, then $OPENMOE_* environment variables.

  Args:
    tfds_data_dir: TFDS data dir holding OpenMoE's builders (`redpajama_c4/1.0.0`, ...).
    redpajama_dir: RedPajama-1T download: `<subset>/**/*.jsonl[.gz|.zst]` ("text" field).
    the_stack_dir: The Stack dedup download: `**/*.parquet` ("content" column).
    wikipedia_dir: Wikipedia-en as `**/*.jsonl[.gz]` ("text") or `**/*.txt` (a doc per line).
  """
  given = dict(tfds_data_dir=tfds_data_dir, redpajama_dir=redpajama_dir,
               the_stack_dir=the_stack_dir, wikipedia_dir=wikipedia_dir)
  return DataDirs(**{k: v or os.environ.get(_ENV[k]) for k, v in given.items()})


def stats_for(name: str) -> corpus.DocumentStats:
  return SOURCE_STATS.setdefault(name, corpus.DocumentStats())


# --------------------------------------------------------------------------- file readers
def _open_text_lines(path: str) -> Iterator[bytes]:
  if path.endswith(".zst"):
    try:
      import zstandard  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path} is zstd-compressed: `pip install zstandard` or decompress "
                        "it first") from e
    with open(path, "rb") as f:
      yield from io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
  elif path.endswith(".gz"):
    with gzip.open(path, "rb") as f:
      yield from f
  else:
    with tf.io.gfile.GFile(path, "rb") as f:
      yield from f


def read_jsonl(path: str, field: str = "text") -> Iterator:
  """Raw `field` values of a JSON-lines file; undecodable lines come back as invalid bytes."""
  for line in _open_text_lines(path):
    yield _jsonl_line(line, field)


def read_text_lines(path: str, field: Optional[str] = None) -> Iterator[bytes]:
  """One document per line (bytes; decoded and checked by `clean_document`)."""
  del field
  for line in _open_text_lines(path):
    yield line.rstrip(b"\r\n")


def read_parquet(path: str, column: str = "content") -> Iterator:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=256):
    yield from (v if v is not None else "" for v in batch.column(0).to_pylist())


def _jsonl_line(line: bytes, field: str = "text"):
  """`read_jsonl`'s value for one line."""
  if not line.strip():
    return ""
  try:
    row = json.loads(line)
  except (UnicodeDecodeError, ValueError):
    return b"\xff"  # counted as invalid by clean_document
  if not isinstance(row, dict) or field not in row:
    return corpus.MISSING_FIELD  # counted as missing_field by clean_document
  return row[field]


def line_parser_for(path: str, field: str = "text") -> Optional[Callable[[bytes], Any]]:
  """The per-line parser of a file TensorFlow can read line by line (`.jsonl`, `.json`, `.txt`,
  plain or `.gz`), or None (parquet, zstd: read by a Python generator)."""
  if path.endswith(".zst"):
    return None
  base = path[:-3] if path.endswith(".gz") else path
  if base.endswith((".jsonl", ".json")):
    return lambda line: _jsonl_line(line, field)
  if base.endswith(".txt"):
    return lambda line: line.rstrip(b"\r\n")
  return None


def reader_for(path: str) -> Callable[[str], Iterator]:
  """The document reader for a file, by extension."""
  base = path[:-4] if path.endswith(".zst") else path[:-3] if path.endswith(".gz") else path
  if base.endswith((".jsonl", ".json")):
    return read_jsonl
  if base.endswith(".parquet"):
    return read_parquet
  if base.endswith(".txt"):
    return read_text_lines
  raise ValueError(f"unsupported document file {path}: use .jsonl[.gz|.zst], .parquet or .txt")


# --------------------------------------------------------------------------- sources
class DocumentSource(seqio.DataSource):
  """Documents `{"text": str}` from a list of files per split.

  Sharding is by file when there are at least as many files as shards (seqio decides through
  `list_shards`), otherwise seqio shards the examples; either way host shards are disjoint and
  together cover the split. The file order is shuffled with the seed when `shuffle` is set.

  How files are read decides whether a training run resumes its input in constant time:
  `read_document` (one document per file, the built-in corpus) and `parse_line` (files
  TensorFlow reads line by line: JSON lines and text, plain or gzip) build a pipeline of
  TensorFlow datasets whose position tf.data can save; `read_file` (a Python generator, e.g.
  parquet or zstd) cannot be saved, and a resumed run replays the stream instead.
  """

  def __init__(self, name: str, list_files: Callable[[str], Sequence[str]],
               read_file: Optional[Callable[[str], Iterator]] = None,
               splits: Sequence[str] = ("train",),
               max_chars: int = corpus.MAX_DOCUMENT_CHARS, max_examples: Mapping = None,
               skip_examples: Mapping = None, *,
               read_document: Optional[Callable[[str], Any]] = None,
               parse_line: Optional[Callable[[str], Optional[Callable[[bytes], Any]]]] = None):
    """read_file: path -> raw documents (a generator); read_document: path -> the file's one
    raw document; parse_line: path -> that file's line parser (line -> raw document), or None
    for a file that is read by `read_file`. max_examples: split -> documents kept (the first
    ones); skip_examples: split -> {file: leading documents of that file left out} (a held-out
    slice)."""
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
    if read_file is None and read_document is None:
      raise ValueError("give read_file or read_document")
    self._name = name
    self._list_files = list_files
    self._read_file = read_file
    self._read_document = read_document
    self._parse_line = parse_line
    self._max_chars = max_chars
    self._max_examples = dict(max_examples or {})
    self._skip_examples = {k: dict(v) for k, v in (skip_examples or {}).items()}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    files = list(self._list_files(split))
    if not files:
      raise UsageFileNotFoundError(f"{self._name}: no files for split {split!r}")
    return files

  def _clean(self, raw):
    return corpus.clean_document(raw, stats_for(self._name), self._max_chars)

  def _documents(self, path, skip=0):
    for raw in self._read_file(path.decode() if isinstance(path, bytes) else path):
      text = self._clean(raw)
      if text is None:
        continue
      if skip > 0:
        skip -= 1
        continue
      yield text

  def _line_parsers(self, files) -> Optional[dict]:
    """{file: parser} when every file is read line by line by TensorFlow, else None."""
    if self._parse_line is None:
      return None
    parsers = {f: self._parse_line(f) for f in files}
    return parsers if all(parsers.values()) else None

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    files = list(self.list_shards(split))
    if shard_info:
      files = files[shard_info.index::shard_info.num_shards]
    if shuffle:
      files = [files[i] for i in np.random.RandomState(seed).permutation(len(files))]
    held_out = self._skip_examples.get(split, {})
    skips = tf.constant([int(held_out.get(f, 0)) for f in files], tf.int64)
    paths = tf.constant(files, tf.string)
    parsers = self._line_parsers(files)
    if self._read_document is not None:
      per_file = self._file_documents
    elif parsers is not None:
      per_file = lambda path, skip: self._line_documents(path, skip, parsers)
    else:
      per_file = lambda path, skip: tf.data.Dataset.from_generator(
          self._documents, args=(path, skip), output_signature=tf.TensorSpec([], tf.string))
    ds = tf.data.Dataset.from_tensor_slices((paths, skips)).interleave(
        per_file, cycle_length=min(4, len(files)), block_length=1)
    if split in self._max_examples:
      ds = ds.take(self._max_examples[split])
    return ds.map(lambda text: {"text": text})

  def _cleaned(self, ds: tf.data.Dataset, read, skip) -> tf.data.Dataset:
    """raw items -> cleaned documents (a Python call per item, order kept), `skip` left out."""
    def clean(item):
      text = self._clean(read(item))
      return b"" if text is None else text.encode("utf-8"), text is not None
    ds = ds.map(lambda item: tf.numpy_function(clean, [item], (tf.string, tf.bool),
                                               stateful=False))
    return ds.filter(lambda text, keep: keep).map(
        lambda text, keep: tf.ensure_shape(text, [])).skip(skip)

  def _file_documents(self, path, skip) -> tf.data.Dataset:
    return self._cleaned(tf.data.Dataset.from_tensors(path),
                         lambda p: self._read_document(p.decode()), skip)

  def _line_documents(self, path, skip, parsers) -> tf.data.Dataset:
    by_path = {f.encode(): parse for f, parse in parsers.items()}
    compression = tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")
    lines = tf.data.TextLineDataset(path, compression_type=compression)
    # Each line travels with its file's path, which picks the parser.
    return self._cleaned(lines.map(lambda line: tf.stack([line, path])),
                         lambda pair: by_path[pair[1]](pair[0]), skip)


def stdlib_source(kind: str = "source") -> DocumentSource:
  """The built-in corpus: stdlib files as documents ('source') or their docstrings."""
  list_files = corpus.list_files
  if kind == "docstrings":
    def list_files(split, _list=corpus.list_files):
      # Parse every file here, in the thread that builds the dataset: CPython 3.11's parser
      # state is per interpreter, and ast.parse on tf.data's threads races with any other
      # compile() in the process (TF autograph included) even under our own lock.
      paths = _list(split)
      for path in paths:
        corpus.raw_document(path, kind)
      return paths
  return DocumentSource(
      f"builtin_{kind}", list_files, splits=("train", "validation"),
      read_document=lambda path: corpus.raw_document(path, kind))


class DeferredSource(seqio.DataSource):
  """Builds its real source on first use, so registration never touches disk or network."""

  def __init__(self, build: Callable[[], seqio.DataSource], splits: Sequence[str]):
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
    self._build = build
    self._source = None

  @property
  def source(self) -> seqio.DataSource:
    if self._source is None:
      self._source = self._build()
    return self._source

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return self.source.supports_arbitrary_sharding

  def list_shards(self, split: str) -> Sequence[str]:
    return self.source.list_shards(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  **kwargs) -> tf.data.Dataset:
    return self.source.get_dataset(split=split, shuffle=shuffle, seed=seed,
                                   shard_info=shard_info, **kwargs)


def _glob_files(root: str, patterns: Sequence[str]) -> list:
  return sorted({f for p in patterns for f in glob.glob(os.path.join(root, "**", p),
                                                         recursive=True)})


VALIDATION_DOCUMENTS = 2000  # OpenMoE's NUM_VAL_EXAMPLES for redpajama_c4


def file_or_tfds_source(name: str, raw_dir_attr: str, subdir: str, patterns: Sequence[str],
                        tfds_name: str, text_key: str, splits: Mapping[str, str],
                        field: str = "text") -> seqio.DataSource:
  """Resolves one OpenMoE subset to raw files or its TFDS builder; raises if neither exists.

  Args:
    name: source name (for statistics and errors).
    raw_dir_attr: the `DataDirs` field holding the raw download.
    subdir: subdirectory of that download for this subset ('' for the whole tree).
    patterns: file globs searched recursively there.
    tfds_name: OpenMoE's TFDS builder, e.g. 'redpajama_c4:1.0.0'.
    text_key: the TFDS feature holding the document.
    splits: split name -> TFDS split spec (e.g. validation: 'train[-2000:]').
    field: JSON field / parquet column of the raw files.
  """
  dirs = data_dirs()
  looked = []
  raw_root = getattr(dirs, raw_dir_attr)
  if raw_root:
    root = os.path.join(raw_root, subdir)
    files = _glob_files(root, patterns)
    if files:
      return _raw_source(name, files, splits, field)
    looked.append(f"{root}/**/{{{','.join(patterns)}}}")
  if dirs.tfds_data_dir:
    builder, version = tfds_name.split(":")
    path = os.path.join(dirs.tfds_data_dir, builder, version)
    if tf.io.gfile.isdir(path):
      return seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=dirs.tfds_data_dir,
                                  splits=dict(splits))
    looked.append(path)
  hint = "" if looked else (f" (configure tasks.sources.data_dirs.{raw_dir_attr} or "
                            "tfds_data_dir, or the matching $OPENMOE_* variable)")
  raise UsageFileNotFoundError(f"no data for {name}: looked for {looked or 'nothing'}{hint}")


def _raw_source(name, files, splits, field):
  read = lambda path: reader_for(path)(path, field)
  # OpenMoE held out `train[-2000:]` and trained on `train[:-2000]` (XueFuzhao/text-to-text-
  # transfer-transformer `t5/data/tasks.py`, redpajama_c4_*): here the held-out slice is the first
  # 2000 documents of the last file, and the train split skips exactly those.
  by_split = {"train": files, "validation": files[-1:]}
  held_out = {"train": {files[-1]: VALIDATION_DOCUMENTS}} if "validation" in splits else {}
  return DocumentSource(name, lambda split: by_split[split], read, splits=tuple(splits),
                        parse_line=lambda path: line_parser_for(path, field),
                        max_examples={"validation": VALIDATION_DOCUMENTS},
                        skip_examples=held_out)
