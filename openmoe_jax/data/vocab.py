"""Vocabularies with OpenMoE's conventions (umT5's SentencePiece model, XueFuzhao/text-to-text-transfer-transformer `t5/data/utils.py`).

* ids: pad 0, eos 1, unk 2; BOS is the pad id 0 (decoder inputs are targets shifted right by 0);
* sentinels: `extra_ids` (300 for OpenMoE) appended by seqio at the top of the vocabulary and
  numbered downward: `<extra_id_0>` = vocab_size - 1;
* OpenMoE's model is umT5's SentencePiece (256000 pieces + 300 = 256300 ids, embedding padded to
  256384). Its path is configured, never downloaded:
  gin `openmoe_jax.vocab.umt5_spm_path.path = %UMT5_SPM_PATH`, or env `OPENMOE_SPM_PATH`.
  The path is resolved when the vocabulary is first used, so importing `tasks` before gin
  parses its bindings is fine.
* The built-in corpus uses `openmoe_jax.data.corpus.SPM_PATH` (7892 pieces + 300 = 8192 ids).
* The tools find a run's vocabulary with `resolve_vocabulary`: the task they are given, else
  MODEL_DIR/vocabulary.json (what `openmoe-import` records: umT5 for OpenMoE, the folder's
  Hugging Face tokenizer for the families, `hf_vocab.py`), else the task the run trained on.
"""
import os
from typing import Optional

import gin
import seqio

from openmoe_jax import fs
from openmoe_jax.errors import UsageError, UsageFileNotFoundError, UsageValueError, error_line

from openmoe_jax.data.special_tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # noqa: F401
from openmoe_jax.data import corpus
OPENMOE_EXTRA_IDS = 300
UMT5_PIECES = 256_000
SPM_PATH_ENV = "OPENMOE_SPM_PATH"


@gin.configurable(module="openmoe_jax.vocab")
def umt5_spm_path(path: Optional[str] = None) -> str:
  """Path of OpenMoE's umT5 SentencePiece model (gin, else $OPENMOE_SPM_PATH).

  Args:
    path: e.g. `gs://fuzhao/tokenizers/umt5.256000/sentencepiece.model` or a local copy.

  Raises:
    ValueError: nothing configured.
    FileNotFoundError: the configured file does not exist.
    (Both are UsageErrors: the commands report them in one line with exit code 2.)
  """
  path = path or os.environ.get(SPM_PATH_ENV)
  if not path:
    raise UsageValueError("no umT5 SentencePiece model configured: bind "
                     "openmoe_jax.vocab.umt5_spm_path.path (gin macro UMT5_SPM_PATH) or set "
                     f"${SPM_PATH_ENV}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise UsageFileNotFoundError(f"umT5 SentencePiece model not found: {path}")
  return path


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose model path is looked up on first use.

  seqio tasks are registered at import time, before gin bindings exist; this class defers the
  lookup (and any disk access) until a dataset actually needs the tokenizer.
  """

  def __init__(self, path_fn=umt5_spm_path, extra_ids: int = OPENMOE_EXTRA_IDS):
    self._path_fn = path_fn
    self._resolved_path = None
    super().__init__(sentencepiece_model_file=None, extra_ids=extra_ids)

  @property
  def _sentencepiece_model_file(self):
    if self._resolved_path is None:
      self._resolved_path = self._path_fn()
    return self._resolved_path

  @_sentencepiece_model_file.setter
  def _sentencepiece_model_file(self, value):
    # seqio's __init__ assigns the path; None keeps the lazy lookup.
    self._resolved_path = value

  def __getstate__(self):
    state = super().__getstate__()
    state["_resolved_path"] = self._sentencepiece_model_file
    return state



def openmoe_vocabulary(extra_ids: int = OPENMOE_EXTRA_IDS) -> seqio.Vocabulary:
  """OpenMoE's umT5 vocabulary (path from gin / env, resolved lazily)."""
  return LazySentencePieceVocabulary(umt5_spm_path, extra_ids)


def builtin_vocabulary(extra_ids: int = OPENMOE_EXTRA_IDS) -> seqio.Vocabulary:
  """The built-in corpus vocabulary: 7892 stdlib pieces + `extra_ids` sentinels."""
  return seqio.SentencePieceVocabulary(str(corpus.SPM_PATH), extra_ids=extra_ids)


def padded_vocab_size(vocabulary_size: int, multiple: int = 128) -> int:
  """Embedding rows: the vocabulary size rounded up to `multiple` (256300 -> 256384)."""
  return -(-vocabulary_size // multiple) * multiple


def sentinel_id(vocabulary: seqio.Vocabulary, index: int) -> int:
  """Id of `<extra_id_{index}>`: sentinels count down from the top of the vocabulary."""
  if not 0 <= index < vocabulary.extra_ids:
    raise ValueError(f"sentinel {index} out of range: vocabulary has {vocabulary.extra_ids}")
  return vocabulary.vocab_size - 1 - index


# What `openmoe-import` records for OpenMoE's own checkpoints (MODEL_DIR/vocabulary.json).
UMT5_RECORD = {"kind": "sentencepiece", "model": "umt5", "extra_ids": OPENMOE_EXTRA_IDS}


def from_record(model_dir: str, record: dict) -> seqio.Vocabulary:
  """The vocabulary a vocabulary.json record names (`run_dir.write_vocabulary`), built now, so
  a file that is missing or does not load is a UsageError here, in one line."""
  from openmoe_jax.data import hf_vocab  # late: transformers only for a tokenizer folder

  def where(path):
    return path if fs.is_url(path) or os.path.isabs(path) else fs.join(model_dir, path)

  if record["kind"] == "hf_tokenizer":
    return hf_vocab.HfTokenizerVocabulary(where(record["path"]))
  extra_ids = record.get("extra_ids", 0)
  if record.get("model") == "umt5":
    path = umt5_spm_path()  # UsageError when not configured / not there
  else:
    path = where(record["path"])
    if not fs.isfile(path):
      raise UsageFileNotFoundError(f"SentencePiece model not found: {path} (named by "
                                   f"{fs.join(model_dir, 'vocabulary.json')})")
  vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  try:
    vocabulary.vocab_size  # pylint: disable=pointless-statement  (loads the model now)
  except Exception as e:  # pylint: disable=broad-except  (a damaged model: one line)
    raise UsageValueError(f"{path}: not a readable SentencePiece model "
                          f"({type(e).__name__}: {error_line(e)[:200]})") from None
  return vocabulary


def resolve_vocabulary(model_dir: str, task: Optional[str] = None) -> seqio.Vocabulary:
  """The vocabulary the tools (openmoe-score, openmoe-infer) encode and decode MODEL_DIR's text
  with, the first of:
    1. `task` (--mixture_or_task_name): its targets' vocabulary;
    2. MODEL_DIR/vocabulary.json (what `openmoe-import` records; `from_record`), checked
       against the model's embedding size;
    3. the task the run trained on (run.json's mixture_or_task_name).
  None of them: UsageError. The caller registers the tasks first (`import tasks`: a library
  module does not import them).

  Raises:
    UsageError (one line): an unknown task, a damaged vocabulary.json or a vocabulary it names
      that does not load or has more ids than the model's embedding, or nothing to go by.
  """
  from openmoe_jax.training import run_dir  # late: JAX, only for the tools

  def of_task(name):
    from openmoe_jax.data import pipeline  # late: JAX, only for the tools
    try:
      return pipeline.get_provider(name).output_features["targets"].vocabulary
    except ValueError as e:
      raise UsageError(error_line(e)) from None

  if task:
    return of_task(task)
  record = run_dir.read_vocabulary(model_dir)
  if record is not None:
    vocabulary = from_record(model_dir, record)
    rows = run_dir.load_model_config(model_dir).vocab_size
    if vocabulary.vocab_size > rows:
      raise UsageError(f"{fs.join(model_dir, run_dir.VOCABULARY)} names a vocabulary of "
                       f"{vocabulary.vocab_size} ids, more than the model's {rows} embedding "
                       "rows: not this model's; fix or delete it, or pass --mixture_or_task_name")
    return vocabulary
  name = run_dir.run_info(model_dir).get("mixture_or_task_name")
  if name:
    return of_task(name)
  raise UsageError(f"cannot tell the vocabulary: {model_dir} records no vocabulary.json and no "
                   "task (pass --mixture_or_task_name)")
