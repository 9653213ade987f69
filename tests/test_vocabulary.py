"""The vocabulary an import records (MODEL_DIR/vocabulary.json) and how the tools find it.

A tiny tokenizer is trained offline with `tokenizers` (BPE, SentencePiece-style spaces, a
post-processor that prepends <s> as Llama's does) and saved with transformers'
`PreTrainedTokenizerFast.save_pretrained`; `HfTokenizerVocabulary` must tokenize as that
tokenizer does, without its BOS. A tiny Mixtral built with transformers' classes
(test_hf_families.py) is imported with it and scored by `openmoe-score` without a task: the
scores must be transformers' own log-probs of the same ids.
"""
import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from openmoe_jax.commands import import_model as import_cmd  # noqa: E402
from openmoe_jax.data import corpus, hf_vocab  # noqa: E402
from openmoe_jax.data import vocab as vocab_lib  # noqa: E402
from openmoe_jax.errors import UsageError  # noqa: E402
from openmoe_jax.interop import hf_import  # noqa: E402
from openmoe_jax.model.config import ModelConfig  # noqa: E402
from openmoe_jax.training import run_dir  # noqa: E402

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "hello world, the end.",
             "cats and dogs play in the sun"]
TEXTS = ["the cat sat on the mat", "hello, dogs play", "a  cat\tran in the park.", ""]
HF_RECORD = {"kind": "hf_tokenizer", "path": "hf_tokenizer"}


def _save_tokenizer(folder):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
      vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>", "<s>"]))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 3)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>",
                                              bos_token="<s>")
  fast.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return _save_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok")


def _reference(folder):
  return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, tokenizer_dir):
  """(transformers Mixtral, its tokenizer, the imported MODEL_DIR)."""
  from test_hf_families import _hf_model
  root = tmp_path_factory.mktemp("family")
  model = _hf_model("mixtral")
  model.save_pretrained(root / "hf")
  _save_tokenizer(root / "hf")
  out = hf_import.import_checkpoint(str(root / "hf"), str(root / "run"))
  assert out["vocabulary"] == HF_RECORD and "note" not in out, out
  return model, _reference(root / "hf"), root / "run"


def test_hf_vocabulary_encodes_and_decodes_like_transformers(tokenizer_dir):
  ref = _reference(tokenizer_dir)
  voc = hf_vocab.HfTokenizerVocabulary(str(tokenizer_dir))
  assert (voc.vocab_size, voc.eos_id, voc.unk_id, voc.bos_id, voc.pad_id) == (len(ref), 1, 2, 3, 0)
  assert voc.extra_ids == 0
  for text in TEXTS:
    ids = list(voc.encode(text))
    assert ids == ref(text, add_special_tokens=False).input_ids, text
    if text:
      assert ref(text).input_ids == [3] + ids  # the tokenizer's BOS, which encode leaves out
    assert voc.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert voc.decode(ids + [1, 5, 6]) == voc.decode(ids)  # up to the first EOS, as seqio
  assert voc.decode(voc.encode(TEXTS[0])) == TEXTS[0]
  assert voc.decode([3, 0] + list(voc.encode("the end"))) == "the end"  # special tokens dropped
  again = pickle.loads(pickle.dumps(voc))
  assert again == voc and list(again.encode(TEXTS[1])) == list(voc.encode(TEXTS[1]))


def test_hf_vocabulary_in_tensorflow_and_seqio(tokenizer_dir):
  import seqio
  import tensorflow as tf
  voc = hf_vocab.HfTokenizerVocabulary(str(tokenizer_dir))
  for text in TEXTS:
    assert voc.encode_tf(tf.constant(text)).numpy().tolist() == list(voc.encode(text))
  a, b = list(voc.encode(TEXTS[0])), list(voc.encode(TEXTS[1]))
  width = max(len(a), len(b)) + 3
  rows = np.zeros((2, width), np.int32)
  rows[0, :len(a)] = a
  rows[1, :len(b) + 3] = b + [1, 7, 8]  # decode_tf drops everything after the EOS
  texts = voc.decode_tf(tf.constant(rows)).numpy().tolist()
  assert [t.decode() for t in texts] == [voc.decode(a), voc.decode(b)]
  ds = tf.data.Dataset.from_tensor_slices({"targets": TEXTS[:3]})
  ds = seqio.preprocessors.tokenize(ds, {"targets": seqio.Feature(voc)})
  assert [list(ex["targets"]) for ex in ds.as_numpy_iterator()] == [
      list(voc.encode(t)) for t in TEXTS[:3]]


def test_a_family_import_is_scored_without_a_task(family_run, tmp_path):
  """openmoe-score on the imported MODEL_DIR, no --mixture_or_task_name: the tokenizer's ids
  and transformers' log-probs of them after id 0 (our BOS), in float32."""
  model, ref, run = family_run
  assert json.loads((run / run_dir.VOCABULARY).read_text()) == HF_RECORD
  assert not (run / run_dir.RUN_INFO).exists()  # nothing but vocabulary.json to go by
  lines = TEXTS[:3]
  inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  r = subprocess.run([sys.executable, "-m", "openmoe_jax.commands.score", f"--model_dir={run}",
                      f"--input_file={inp}", f"--output_file={out}", "--max_length=64",
                      "--model_override=activation_dtype=float32"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row["text"] for row in rows] == lines
  for row in rows:
    ids = ref(row["text"], add_special_tokens=False).input_ids
    assert row["token_ids"] == ids
    with torch.no_grad():
      logp = torch.log_softmax(model(torch.tensor([[0] + ids[:-1]])).logits[0], -1).numpy()
    np.testing.assert_allclose(row["log_probs"], logp[np.arange(len(ids)), ids], atol=1e-4)


def test_imports_without_a_usable_tokenizer_record_nothing_and_say_so(tmp_path, capsys):
  from test_hf_families import _hf_model
  _hf_model("mixtral").save_pretrained(tmp_path / "hf")
  for name, words in ((None, "no tokenizer files"),
                      ("tokenizer.json", "the Hugging Face tokenizer does not load")):
    if name:
      (tmp_path / "hf" / name).write_text('{"version": "1.0"}')  # not a tokenizer
    dest = tmp_path / f"run_{name}"
    assert import_cmd.main([f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={dest}"]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["vocabulary"] is None and words in summary["note"], summary
    assert "--mixture_or_task_name" in summary["note"] and "\n" not in summary["note"]
    assert not (dest / run_dir.VOCABULARY).exists()
    assert (dest / run_dir.MODEL_CONFIG).exists()


def test_a_tokenizer_larger_than_the_embedding_is_not_recorded(tokenizer_dir, tmp_path):
  files = {f"hf_tokenizer/{p.name}": str(p) for p in tokenizer_dir.iterdir()}
  record, why = hf_vocab.import_record(files, model_vocab_size=32)
  assert record is None and "more than the model's 32 embedding rows" in why
  assert hf_vocab.import_record(files, model_vocab_size=96) == (HF_RECORD, None)


def test_openmoe_imports_record_umt5(tmp_path, capsys, monkeypatch):
  """t5x and OpenMoE-layout Hugging Face imports: umT5's SentencePiece, found through
  $OPENMOE_SPM_PATH when a tool needs it (here pointed at the built-in model)."""
  from test_t5x_checkpoint import TINY_GIN, _params, write_t5x
  from openmoe_jax.commands import export as export_cmd
  src = write_t5x(str(tmp_path / "checkpoint_7"), _params())
  assert import_cmd.main([f"--t5x_checkpoint={src}", f"--model_dir={tmp_path / 't5x'}",
                          *TINY_GIN]) == 0
  assert export_cmd.main([f"--model_dir={tmp_path / 't5x'}", f"--output_dir={tmp_path / 'hf'}",
                          f"--spm_path={corpus.SPM_PATH}"]) == 0
  assert import_cmd.main([f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'back'}"]) == 0
  summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
  assert summary["vocabulary"] == vocab_lib.UMT5_RECORD and "note" not in summary
  want = {"kind": "sentencepiece", "model": "umt5", "extra_ids": 300}
  for name in ("t5x", "back"):
    assert json.loads((tmp_path / name / run_dir.VOCABULARY).read_text()) == want
  monkeypatch.setenv(vocab_lib.SPM_PATH_ENV, str(corpus.SPM_PATH))
  voc = vocab_lib.resolve_vocabulary(str(tmp_path / "back"))
  assert voc.vocab_size == 8192 and voc.extra_ids == 300
  assert list(voc.encode("def f():")) == list(vocab_lib.builtin_vocabulary().encode("def f():"))


def test_upcycling_records_the_dense_tokenizer(tmp_path, capsys):
  from test_upcycle import CASES, SIZES, _dense
  _dense("llama").save_pretrained(tmp_path / "dense")
  _save_tokenizer(tmp_path / "dense")
  run = tmp_path / "moe"
  assert import_cmd.main([f"--upcycle_from={tmp_path / 'dense'}", f"--model_dir={run}",
                          *CASES["llama"][1], *SIZES]) == 0
  assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["vocabulary"] == HF_RECORD
  voc = vocab_lib.resolve_vocabulary(str(run))
  assert isinstance(voc, hf_vocab.HfTokenizerVocabulary)
  assert list(voc.encode(TEXTS[0])) == _reference(tmp_path / "dense")(
      TEXTS[0], add_special_tokens=False).input_ids


def _model_dir(d, *, vocab_size=96, task=None, record=None, tokenizer=None):
  """A MODEL_DIR as far as the resolver reads it: model_config.json, and run.json /
  vocabulary.json / hf_tokenizer when given."""
  run_dir.write_model_config(str(d), ModelConfig(vocab_size=vocab_size))
  if task:
    (d / run_dir.RUN_INFO).write_text(json.dumps({"mixture_or_task_name": task}))
  if record is not None:
    run_dir.write_vocabulary(str(d), record)
  if tokenizer is not None:
    shutil.copytree(tokenizer, d / "hf_tokenizer")
  return d


def test_resolution_order(tokenizer_dir, tmp_path):
  """--mixture_or_task_name, then vocabulary.json, then the task the run trained on."""
  import tasks  # noqa: F401  registers the built-in tasks
  d = tmp_path / "both"
  d.mkdir()
  _model_dir(d, vocab_size=8192, task="builtin_corpus_full_lm", record=HF_RECORD,
             tokenizer=tokenizer_dir)
  builtin = vocab_lib.builtin_vocabulary()
  assert vocab_lib.resolve_vocabulary(str(d), "builtin_corpus_full_lm") == builtin
  assert isinstance(vocab_lib.resolve_vocabulary(str(d)), hf_vocab.HfTokenizerVocabulary)
  (d / run_dir.VOCABULARY).unlink()
  assert vocab_lib.resolve_vocabulary(str(d)) == builtin
  (d / run_dir.RUN_INFO).unlink()
  with pytest.raises(UsageError, match="cannot tell the vocabulary.*--mixture_or_task_name"):
    vocab_lib.resolve_vocabulary(str(d))
  with pytest.raises(UsageError, match="no_such_task"):
    vocab_lib.resolve_vocabulary(str(d), "no_such_task")
  # A SentencePiece file of its own, relative to MODEL_DIR.
  shutil.copyfile(corpus.SPM_PATH, d / "spm.model")
  run_dir.write_vocabulary(str(d), {"kind": "sentencepiece", "path": "spm.model",
                                    "extra_ids": 300})
  voc = vocab_lib.resolve_vocabulary(str(d))
  assert voc.vocab_size == 8192 and list(voc.encode("import os")) == list(builtin.encode("import os"))
  assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]  # written by rename


@pytest.mark.parametrize("damage, words", [
    ("{not json", "vocabulary.json: not valid JSON"),
    ('["hf_tokenizer"]', "vocabulary.json: not a JSON object"),
    ('{"kind": "wordpiece"}', "vocabulary.json: unknown kind 'wordpiece'"),
    ('{"kind": "sentencepiece", "model": "umt5", "extra_ids": -1}', "\"extra_ids\" must be"),
    ('{"kind": "hf_tokenizer", "path": "gone"}', "Hugging Face tokenizer folder not found"),
    ('{"kind": "sentencepiece", "path": "gone.model"}', "SentencePiece model not found"),
    (None, "cannot tell the vocabulary"),  # no vocabulary.json, no run.json
])
def test_a_damaged_or_missing_vocabulary_json_is_one_line(family_run, tmp_path, capsys, damage,
                                                          words):
  """openmoe-score and openmoe-infer: one line naming the problem, exit 2, nothing written."""
  from openmoe_jax.commands import infer, score
  _, _, run = family_run
  d = tmp_path / "run"
  shutil.copytree(run, d)
  if damage is None:
    (d / run_dir.VOCABULARY).unlink()
  else:
    (d / run_dir.VOCABULARY).write_text(damage)
  inp = tmp_path / "in.txt"
  inp.write_text("the cat\n")
  for prog, main in (("openmoe-score", score.main), ("openmoe-infer", infer.main)):
    out = tmp_path / f"{prog}.jsonl"
    assert main([f"--model_dir={d}", f"--input_file={inp}", f"--output_file={out}",
                 "--max_length=64"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and words in last, last
    assert not out.exists() and not (tmp_path / f"{prog}.jsonl.tmp").exists()


def test_a_vocabulary_json_for_another_model_is_refused(tokenizer_dir, tmp_path):
  d = tmp_path / "small"
  d.mkdir()
  _model_dir(d, vocab_size=32, record=HF_RECORD, tokenizer=tokenizer_dir)
  with pytest.raises(UsageError, match="more than the model's 32 embedding rows") as e:
    vocab_lib.resolve_vocabulary(str(d))
  assert "\n" not in str(e.value)
