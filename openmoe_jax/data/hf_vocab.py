"""A Hugging Face tokenizer folder as a seqio Vocabulary (the vocabulary `openmoe-import` records
for Mixtral / OLMoE / Qwen3-MoE and upcycled models: MODEL_DIR/hf_tokenizer, docs/models.md).

The tokenizer is transformers' own, built offline from the folder's files
(`AutoTokenizer.from_pretrained(folder, local_files_only=True)`,
https://huggingface.co/docs/transformers/main_classes/tokenizer), so text is split exactly as
the family's transformers tokenizer splits it. With seqio's conventions on top:

* `encode` adds no BOS or EOS (transformers' `add_special_tokens=False`), as every seqio
  vocabulary; our decoders start from id 0, whatever the family's BOS is;
* `decode` keeps the ids up to the first EOS (seqio's `Vocabulary.decode`) and drops special
  tokens (`skip_special_tokens=True`: EOS, padding, BOS), as SentencePiece drops its control
  pieces;
* `eos_id`, `unk_id` and `bos_id` are the tokenizer's; `vocab_size` is `len(tokenizer)` (added
  tokens included), no extra ids;
* `pad_id` stays 0 (seqio's and t5x's convention): a family whose id 0 is a real token (Qwen's
  `!`, Mixtral's `<unk>`) has it read as padding by the data pipeline (docs/models.md).

`encode_tf` / `decode_tf` run the same Python tokenizer through `tf.py_function`, so seqio can
use the vocabulary in a task (one scalar string per `encode_tf` call).
"""
import os
import shutil
import tempfile
from typing import Optional, Tuple

import numpy as np
import seqio

from openmoe_jax import fs
from openmoe_jax.errors import UsageError, error_line

# Files that make a tokenizer by themselves (the others only configure one).
_TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")
_BPE_FILES = ("vocab.json", "merges.txt")


def has_tokenizer(names) -> bool:
  """Whether files of these names make a tokenizer (not only its configuration)."""
  names = {os.path.basename(n) for n in names}
  return bool(names & set(_TOKENIZER_MODELS)) or set(_BPE_FILES) <= names


def load_tokenizer(path: str, where: Optional[str] = None):
  """transformers' tokenizer of the folder `path` (local or a URL, copied to a temporary folder
  first), offline, no remote code; UsageError in one line, naming the folder as `where`
  (default: `path`), when it does not load."""
  where = where or path
  if not fs.isdir(path):
    raise UsageError(f"Hugging Face tokenizer folder not found: {path}")
  if fs.is_url(path):
    local = tempfile.mkdtemp(prefix="openmoe-hf-tokenizer-")
    try:
      for name in fs.listdir(path):
        fs.copy(fs.join(path, name), os.path.join(local, name))
      return load_tokenizer(local, where)
    finally:
      shutil.rmtree(local, ignore_errors=True)
  if not has_tokenizer(os.listdir(path)):
    raise UsageError(f"{where} holds no tokenizer (no {' or '.join(_TOKENIZER_MODELS)}, no "
                     f"{' + '.join(_BPE_FILES)})")
  import transformers  # late: transformers is slow to import; only this vocabulary needs it
  verbosity = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()  # its notes on loading are not the user's concern
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                      trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-except  (any damage: one line, no traceback)
    raise UsageError(f"{where}: the Hugging Face tokenizer does not load "
                     f"({type(e).__name__}: {error_line(e)[:200]})") from None
  finally:
    transformers.logging.set_verbosity(verbosity)


class HfTokenizerVocabulary(seqio.Vocabulary):
  """transformers' tokenizer of a local folder (or URL) as a seqio Vocabulary (module
  docstring). The tokenizer is loaded when the vocabulary is made: a folder that does not
  load is a UsageError there, not at the first encode."""

  def __init__(self, path: str):
    self._path = path
    self._tokenizer = load_tokenizer(path)
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self._path

  @property
  def tokenizer(self):
    return self._tokenizer

  @property
  def bos_id(self) -> Optional[int]:
    return self._tokenizer.bos_token_id

  @property
  def eos_id(self) -> Optional[int]:
    return self._tokenizer.eos_token_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._tokenizer.unk_token_id

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokenizer)

  def _encode(self, s: str):
    return list(self._tokenizer.encode(s, add_special_tokens=False))

  def _decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _upto_eos(self, ids) -> list:
    """The ids through the first EOS: what `decode` keeps (decode_tf pads after it with id 0,
    which in some families is a real token)."""
    ids = [int(i) for i in ids]
    eos = self.eos_id
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids

  def _encode_tf(self, s):
    import tensorflow as tf  # late: seqio has loaded it already; kept off the module's top
    if s.shape.rank not in (None, 0):
      raise ValueError(f"HfTokenizerVocabulary.encode_tf takes one scalar string, got shape "
                       f"{s.shape}")
    def encode(text):
      return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)
    ids = tf.py_function(encode, [s], tf.int32)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids):
    import tensorflow as tf  # late: seqio has loaded it already; kept off the module's top
    def decode(batch):
      array = batch.numpy()
      rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
      texts = [self._decode(self._upto_eos(row)).encode("utf-8") for row in rows]
      return np.asarray(texts, dtype=object).reshape(array.shape[:-1])
    texts = tf.py_function(decode, [ids], tf.string)
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other):
    return isinstance(other, HfTokenizerVocabulary) and other.path == self.path

  def __hash__(self):
    return hash((HfTokenizerVocabulary, self._path))

  def __getstate__(self):
    return {"path": self._path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __repr__(self):
    return f"HfTokenizerVocabulary({self._path!r}, vocab_size={self.vocab_size})"


def import_record(files: dict, model_vocab_size: int) -> Tuple[Optional[dict], Optional[str]]:
  """(vocabulary.json record, None) for the tokenizer files an import keeps, {name in MODEL_DIR
  (e.g. 'hf_tokenizer/tokenizer.json'): source file}; or (None, the reason) when they make no
  usable vocabulary: no tokenizer among them, a tokenizer that does not load, or one with more
  ids than the model's embedding. The files are loaded as they will lie in MODEL_DIR (from a
  temporary copy), so the record names a vocabulary the tools can build."""
  if not files or not has_tokenizer(files):
    return None, (f"the folder has no tokenizer files ({', '.join(_TOKENIZER_MODELS)} or "
                  f"{' + '.join(_BPE_FILES)})")
  folders = {os.path.dirname(name) for name in files}
  if len(folders) != 1 or not next(iter(folders)):
    raise ValueError(f"tokenizer files must share one folder in MODEL_DIR, got {sorted(files)}")
  folder = folders.pop()
  local = tempfile.mkdtemp(prefix="openmoe-hf-tokenizer-")
  try:
    for name, src in files.items():
      shutil.copyfile(src, os.path.join(local, os.path.basename(name)))
    try:
      size = len(load_tokenizer(local, where=f"MODEL_DIR/{folder}"))
    except UsageError as e:
      return None, str(e)
  finally:
    shutil.rmtree(local, ignore_errors=True)
  if size > model_vocab_size:
    return None, (f"its tokenizer has {size} ids, more than the model's {model_vocab_size} "
                  "embedding rows")
  return {"kind": "hf_tokenizer", "path": folder}, None
