"""Built-in corpus: the Python standard library's own sources, plus a SentencePiece model for it.

Every machine that runs this package has the stdlib's `.py` files: real code with English
docstrings and comments (~14 MB, ~730 files on CPython 3.11, test suites excluded). The quick
start trains on them, so it needs no download.

* Documents: one per source file (`kind="source"`), or the file's docstrings only
  (`kind="docstrings"`, English prose, extracted with `ast`).
* Split: by a CRC32 of the file's path relative to the stdlib root, so the split of a file does
  not depend on which other files exist (`VALIDATION_PERCENT` of them go to validation).
* Vocabulary: a unigram SentencePiece model with `SPM_PIECES` pieces, **shipped** in
  `openmoe_jax/assets/` (~125 KB). Shipping rather than building on first use keeps token ids
  identical on every machine: the stdlib differs between Python versions, so a model retrained
  elsewhere would differ. `python -m openmoe_jax.data.corpus --rebuild_spm=DIR` retrains it with the
  recorded settings and prints its SHA-256 next to `SPM_SHA256` (equal on CPython 3.11.7).
  Together with seqio's 300 sentinels the vocabulary has 7892 + 300 = 8192 ids, a multiple of
  128, so the embedding needs no padding.
"""
import argparse
import ast
import collections
import functools
import hashlib
import os
import pathlib
import sys
import sysconfig
import threading
import zlib
from typing import Iterator, Optional

from openmoe_jax.data import special_tokens

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
SPM_PIECES = 7892
SPM_EXTRA_IDS = 300
SPM_PATH = ASSETS / "stdlib_unigram_7892.model"
SPM_SHA256 = "8ee2b3afcf114af21bd656030ca15c04a5a8ba2f9c5ffe211fdf61772f657db0"
VALIDATION_PERCENT = 2
# Documents longer than this are truncated (and counted): one pathological file must not stall
# a tf.data worker. The UL2 / full-LM preprocessors cut random 65536-token windows anyway.
MAX_DOCUMENT_CHARS = 1 << 20

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__", "lib-dynload"})
_SPM_TRAIN_ARGS = dict(
    vocab_size=SPM_PIECES, model_type="unigram", character_coverage=1.0,
    # OpenMoE/T5 ids; BOS is the pad id, so SentencePiece has none of its own.
    pad_id=special_tokens.PAD_ID, eos_id=special_tokens.EOS_ID, unk_id=special_tokens.UNK_ID,
    bos_id=-1,
    # Code needs its whitespace: keep indentation runs and newlines as pieces.
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"],
    split_digits=True, byte_fallback=True,
    input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=1,
    max_sentence_length=8192, minloglevel=2)


# --------------------------------------------------------------------------- statistics
class DocumentStats:
  """Thread-safe counters of what document cleaning kept, skipped and truncated."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, key: str, n: int = 1) -> None:
    with self._lock:
      self._counts[key] += n

  def snapshot(self) -> dict:
    with self._lock:
      return dict(self._counts)

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()


# Per-source counters, filled by the sources that read documents (tasks/sources.py), read by the
# training loop at each evaluation.
SOURCE_STATS: dict = {}


# What a document source yields for a JSON line without the document's field (or not an
# object): not UTF-8, so it cannot be a document, and told apart from one that is not UTF-8.
MISSING_FIELD = b"\xff<no such field>"
SKIP_KINDS = ("empty", "invalid_utf8", "missing_field", "truncated")


def skipped_document_counts() -> dict:
  """{"empty": n, "invalid_utf8": n, "missing_field": n, "truncated": n} summed over every
  source read so far."""
  total = collections.Counter()
  for stats in list(SOURCE_STATS.values()):
    total.update(stats.snapshot())
  return {k: int(total.get(k, 0)) for k in SKIP_KINDS}


def clean_document(raw, stats: Optional[DocumentStats] = None,
                   max_chars: int = MAX_DOCUMENT_CHARS) -> Optional[str]:
  """Decodes and checks one raw document; None means skip it.

  Args:
    raw: bytes (decoded as strict UTF-8) or str.
    stats: counters to update: `documents`, `empty`, `invalid_utf8`, `missing_field`,
      `truncated`.
    max_chars: documents are cut to this many characters.

  Returns:
    The text, or None for empty / undecodable documents.
  """
  stats = stats or DocumentStats()
  if isinstance(raw, bytes) and raw == MISSING_FIELD:
    stats.add("missing_field")
    return None
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError:
      stats.add("invalid_utf8")
      return None
  if not raw.strip():
    stats.add("empty")
    return None
  if len(raw) > max_chars:
    stats.add("truncated")
    raw = raw[:max_chars]
  stats.add("documents")
  return raw


# --------------------------------------------------------------------------- files and splits
def stdlib_root() -> pathlib.Path:
  """The directory holding this interpreter's standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
  """'validation' for VALIDATION_PERCENT of paths (by CRC32 of the path), else 'train'."""
  bucket = zlib.crc32(relative_path.encode("utf-8")) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


def list_files(split: str, root: Optional[pathlib.Path] = None) -> list:
  """Sorted absolute paths of the stdlib `.py` files in `split` ('train' or 'validation')."""
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; the built-in corpus has 'train' and 'validation'")
  root = pathlib.Path(root) if root else stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"standard library not found at {root}")
  return [p for p in _py_files(str(root)) if split_of(os.path.relpath(p, root)) == split]


@functools.lru_cache(maxsize=8)
def _py_files(root: str) -> tuple:
  """Sorted `.py` files under root, skipping _EXCLUDED_DIRS (pruned, not walked: site-packages
  can be large) and symlinked directories (as pathlib's rglob does). Listed once per process."""
  files = []
  for parent, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
    # _sysconfigdata_* describes the build machine, not the language: skip it.
    files += [os.path.join(parent, n) for n in names
              if n.endswith(".py") and not n.startswith("_sysconfigdata")]
  return tuple(sorted(files))


_AST_LOCK = threading.Lock()


def docstrings_of(source: str) -> str:
  """The module, class and function docstrings of a Python source, blank-line separated."""
  try:
    # CPython 3.11's parser keeps recursion state per interpreter: concurrent ast.parse calls
    # (tf.data runs generators on several threads) fail with "recursion depth mismatch".
    with _AST_LOCK:
      tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ""
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
  return "\n\n".join(d for d in docs if d)


def raw_document(path: str, kind: str = "source"):
  """The uncleaned document of a stdlib file: its bytes ('source') or docstrings (str)."""
  if kind == "source":
    return pathlib.Path(path).read_bytes()
  if kind != "docstrings":
    raise ValueError(f"unknown document kind {kind!r}; use 'source' or 'docstrings'")
  return _docstrings_of_file(path)


@functools.lru_cache(maxsize=None)
def _docstrings_of_file(path: str):
  # Parsing all files costs ~2 s; the docstrings (~2 MB) are cached for later epochs.
  raw = pathlib.Path(path).read_bytes()
  try:
    return docstrings_of(raw.decode("utf-8"))
  except UnicodeDecodeError:
    return raw  # clean_document counts it as invalid


def read_documents(path: str, kind: str = "source", stats: Optional[DocumentStats] = None,
                   max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
  """Yields the (at most one) cleaned document of a stdlib file, see `raw_document`."""
  text = clean_document(raw_document(path, kind), stats, max_chars)
  if text is not None:
    yield text


# --------------------------------------------------------------------------- SentencePiece
def file_sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def spm_path(verify: bool = False) -> str:
  """Path of the shipped built-in SentencePiece model.

  Args:
    verify: also check its SHA-256 against `SPM_SHA256`.
  """
  if not SPM_PATH.is_file():
    raise FileNotFoundError(f"built-in SentencePiece model missing: {SPM_PATH} "
                            "(rebuild with `python -m openmoe_jax.data.corpus --rebuild_spm=DIR`)")
  if verify and file_sha256(SPM_PATH) != SPM_SHA256:
    raise ValueError(f"{SPM_PATH} has SHA-256 {file_sha256(SPM_PATH)}, expected {SPM_SHA256}")
  return str(SPM_PATH)


def train_spm(out_dir, root: Optional[pathlib.Path] = None) -> str:
  """Trains the built-in SentencePiece model on the train split; returns the model path.

  Reproducible for a given stdlib: fixed file order, fixed sampling seed, one thread.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  lines_path = out_dir / "stdlib_train_lines.txt"
  with open(lines_path, "w", encoding="utf-8") as f:
    for path in list_files("train", root):
      for doc in read_documents(path):
        f.writelines(line + "\n" for line in doc.splitlines() if line.strip())
  spm.set_random_generator_seed(1234)
  prefix = out_dir / SPM_PATH.stem
  spm.SentencePieceTrainer.train(input=str(lines_path), model_prefix=str(prefix),
                                 **_SPM_TRAIN_ARGS)
  lines_path.unlink()
  return _strip_local_paths(str(prefix) + ".model")


def _strip_local_paths(model_path: str) -> str:
  """Blanks the training paths recorded in the model so its checksum is path independent."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(model_path)
  proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
  del proto.trainer_spec.input[:]
  proto.trainer_spec.input.append("stdlib_train_lines.txt")
  proto.trainer_spec.model_prefix = SPM_PATH.stem
  path.write_bytes(proto.SerializeToString(deterministic=True))
  return model_path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rebuild_spm", metavar="DIR", required=True,
                      help="train the built-in SentencePiece model into DIR and compare "
                           "its SHA-256 with the shipped one")
  args = parser.parse_args(argv)
  path = train_spm(args.rebuild_spm)
  digest = file_sha256(path)
  print(f"{path} sha256={digest} shipped={SPM_SHA256} "
        f"{'MATCH' if digest == SPM_SHA256 else 'DIFFERS (other stdlib?)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
