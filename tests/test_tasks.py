"""Task and mixture registrations, sources, vocabularies and the inspection command."""
import gzip
import importlib
import json
import os

import gin
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import tasks  # noqa: E402
from openmoe_jax.data import corpus  # noqa: E402
from openmoe_jax.commands import inspect_data  # noqa: E402
from openmoe_jax.data import vocab as vocab_lib  # noqa: E402
from tasks import openmoe  # noqa: E402
from tasks import sources  # noqa: E402

SUBSETS = ["redpajama_" + s for s in openmoe.REDPAJAMA_SUBSETS] + ["wikipedia", "the_stack_dedup"]
# XueFuzhao/text-to-text-transfer-transformer `t5/data/mixtures.py` (paper Table 1), percent of examples
SPEC_PERCENT = {
    "v1": {"redpajama_c4": 7.5, "redpajama_wikipedia": 2.25, "redpajama_stackexchange": 1.0,
           "redpajama_arxiv": 1.25, "redpajama_book": 2.25, "redpajama_github": 2.25,
           "redpajama_common_crawl": 33.5, "the_stack_dedup": 50.0},
    "stage2": {"redpajama_c4": 15.0, "redpajama_wikipedia": 6.5, "wikipedia": 6.5,
               "redpajama_stackexchange": 2.5, "redpajama_arxiv": 4.5, "redpajama_book": 6.5,
               "redpajama_github": 5.0, "redpajama_common_crawl": 43.5, "the_stack_dedup": 10.0},
    "v2": {"redpajama_c4": 15.0, "redpajama_wikipedia": 4.5, "wikipedia": 2.5,
           "redpajama_stackexchange": 1.0, "redpajama_arxiv": 4.5, "redpajama_book": 4.5,
           "redpajama_github": 5.0, "redpajama_common_crawl": 33.0, "the_stack_dedup": 30.0},
}


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_all_openmoe_names_registered():
  names = set(seqio.TaskRegistry.names())
  for subset in SUBSETS:
    assert {f"{subset}_ul2", f"{subset}_full_lm"} <= names
  assert {"builtin_corpus_ul2", "builtin_corpus_full_lm", "builtin_docstrings_ul2"} <= names
  assert {"mix_ul2", "mix_ul2_stage2", "mix_full_lm_stage2", "mix_ul2_v2", "mix_full_lm_v2",
          "builtin_mix"} <= set(seqio.MixtureRegistry.names())


@pytest.mark.parametrize("mixture,weights,objective", [
    ("mix_ul2", "v1", "ul2"), ("mix_ul2_stage2", "stage2", "ul2"),
    ("mix_full_lm_stage2", "stage2", "full_lm"), ("mix_ul2_v2", "v2", "ul2"),
    ("mix_full_lm_v2", "v2", "full_lm")])
def test_mixture_rates_match_spec(mixture, weights, objective):
  m = seqio.get_mixture_or_task(mixture)
  got = {t.name: 100 * m.get_rate(t) / m.total_rate for t in m.tasks}
  want = {f"{k}_{objective}": v for k, v in SPEC_PERCENT[weights].items()}
  assert got.keys() == want.keys()
  for name, pct in want.items():
    assert got[name] == pytest.approx(pct, abs=1e-9)


def test_registration_is_idempotent_and_reads_nothing(monkeypatch):
  monkeypatch.setattr(sources, "file_or_tfds_source",
                      lambda *a, **k: pytest.fail("registration must not resolve sources"))
  before = (sorted(seqio.TaskRegistry.names()), sorted(seqio.MixtureRegistry.names()))
  importlib.reload(tasks.openmoe)
  importlib.reload(tasks.builtin)
  tasks.register_all()
  assert before == (sorted(seqio.TaskRegistry.names()), sorted(seqio.MixtureRegistry.names()))


def test_missing_sources_name_the_paths_looked_for(tmp_path, monkeypatch):
  for env in ("OPENMOE_TFDS_DATA_DIR", "OPENMOE_REDPAJAMA_DIR"):
    monkeypatch.delenv(env, raising=False)
  task = seqio.get_mixture_or_task("redpajama_arxiv_ul2")
  gin.bind_parameter("tasks.sources.data_dirs.redpajama_dir", str(tmp_path / "rp"))
  gin.bind_parameter("tasks.sources.data_dirs.tfds_data_dir", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError) as e:
    task.source.get_dataset("train")
  assert str(tmp_path / "rp" / "arxiv") in str(e.value)
  assert str(tmp_path / "tfds" / "redpajama_arxiv" / "1.0.0") in str(e.value)


def test_tfds_builder_dir_is_used_when_present(tmp_path):
  (tmp_path / "redpajama_c4" / "1.0.0").mkdir(parents=True)
  gin.bind_parameter("tasks.sources.data_dirs.tfds_data_dir", str(tmp_path))
  src = sources.file_or_tfds_source(
      "redpajama_c4", "redpajama_dir", "c4", ("*.jsonl",), "redpajama_c4:1.0.0", "text",
      {"train": "train", "validation": "train[-2000:]"})
  assert isinstance(src, seqio.TfdsDataSource)
  assert set(src.splits) == {"train", "validation"}


def test_umt5_path_comes_from_gin_and_is_lazy(monkeypatch):
  monkeypatch.delenv(vocab_lib.SPM_PATH_ENV, raising=False)
  v = seqio.get_mixture_or_task("redpajama_c4_ul2").output_features["targets"].vocabulary
  with pytest.raises(ValueError, match="UMT5_SPM_PATH"):
    _ = v.vocab_size
  gin.bind_parameter("openmoe_jax.vocab.umt5_spm_path.path", str(corpus.SPM_PATH))
  fresh = vocab_lib.openmoe_vocabulary()
  assert fresh.vocab_size == corpus.SPM_PIECES + 300 and fresh.extra_ids == 300


def test_builtin_vocabulary_conventions():
  assert corpus.file_sha256(corpus.spm_path(verify=True)) == corpus.SPM_SHA256
  v = vocab_lib.builtin_vocabulary()
  assert v.vocab_size == 8192 == vocab_lib.padded_vocab_size(8192)
  assert (v.pad_id, v.eos_id, v.unk_id, vocab_lib.BOS_ID) == (0, 1, 2, 0)
  assert vocab_lib.sentinel_id(v, 0) == 8191 and vocab_lib.sentinel_id(v, 299) == 7892
  assert v.decode([8191]).strip() == "<extra_id_0>"
  assert vocab_lib.padded_vocab_size(256_300) == 256_384
  code = "def f(x):\n\treturn x  # done\n"
  assert v.decode(v.encode(code)) == code


def test_builtin_split_is_deterministic_and_disjoint():
  train, val = corpus.list_files("train"), corpus.list_files("validation")
  assert len(train) > 500 and 5 <= len(val) < len(train) // 10
  assert not set(train) & set(val)
  assert train == corpus.list_files("train")


def _write_raw_tree(root, long_chars):
  c4 = root / "rp" / "c4"
  c4.mkdir(parents=True)
  lines = [json.dumps({"text": f"document number {i} about tests."}) for i in range(40)]
  lines += ["", json.dumps({"text": "   "}), json.dumps({"text": "x" * long_chars}),
            json.dumps({"content": "the wrong field"}), json.dumps(["not", "an", "object"])]
  (c4 / "c4-train.00000.jsonl").write_bytes(
      "\n".join(lines).encode() + b"\n\x80\x81 broken utf8\n")
  with gzip.open(c4 / "c4-train.00001.jsonl.gz", "wt") as f:
    f.write("\n".join(json.dumps({"text": f"second file doc {i}."}) for i in range(30)))


def test_raw_files_with_bad_documents(tmp_path):
  _write_raw_tree(tmp_path, long_chars=5000)
  gin.bind_parameter("tasks.sources.data_dirs.redpajama_dir", str(tmp_path / "rp"))
  gin.bind_parameter("openmoe_jax.vocab.umt5_spm_path.path", str(corpus.SPM_PATH))
  src = sources.file_or_tfds_source(
      "raw_c4_test", "redpajama_dir", "c4", ("*.jsonl", "*.jsonl.gz"), "redpajama_c4:1.0.0",
      "text", {"train": "train"})
  src._max_chars = 2000  # pylint: disable=protected-access
  docs = [ex["text"] for ex in src.get_dataset("train", shuffle=False).as_numpy_iterator()]
  stats = sources.SOURCE_STATS["raw_c4_test"].snapshot()
  assert stats == {"documents": 71, "empty": 2, "invalid_utf8": 1, "missing_field": 2,
                   "truncated": 1}  # a wrong field name is not counted as invalid UTF-8
  assert len(docs) == 71 and max(map(len, docs)) == 2000
  # the same files through a registered OpenMoE task, end to end
  gin.bind_parameter("tasks.sources.data_dirs.redpajama_dir", str(tmp_path / "rp"))
  task = seqio.TaskRegistry.get("redpajama_c4_ul2")
  task.source._source = None  # pylint: disable=protected-access
  exs = list(task.get_dataset({"inputs": 64, "targets": 64}, shuffle=False, seed=0,
                              num_epochs=1).as_numpy_iterator())
  assert exs and all(ex["inputs"][-1] == 1 and ex["targets"][-1] == 1 for ex in exs)


def test_line_files_are_read_by_tensorflow_and_their_position_saves(tmp_path):
  """JSON lines and text (plain or gzip) are read by tf.data, whose position can be saved;
  parquet and zstd need a Python generator."""
  assert sources.line_parser_for("a.parquet") is None and sources.line_parser_for("a.jsonl.zst") is None
  assert sources.line_parser_for("a.jsonl.gz")(b'{"text": "x"}') == "x"
  assert sources.line_parser_for("a.txt")(b"line\r") == b"line"
  _write_raw_tree(tmp_path, long_chars=10)
  gin.bind_parameter("tasks.sources.data_dirs.redpajama_dir", str(tmp_path / "rp"))
  src = sources.file_or_tfds_source(
      "raw_c4_position_test", "redpajama_dir", "c4", ("*.jsonl", "*.jsonl.gz"),
      "redpajama_c4:1.0.0", "text", {"train": "train"})
  ds = src.get_dataset("train", shuffle=True, seed=3)
  whole = [ex["text"].numpy() for ex in ds]
  it = iter(ds)
  head = [next(it)["text"].numpy() for _ in range(25)]
  position = it._save()  # pylint: disable=protected-access
  again = iter(ds)
  again._restore(position)  # pylint: disable=protected-access
  assert head + [ex["text"].numpy() for ex in again] == whole


def test_builtin_task_examples_end_in_eos_and_start_with_mode():
  task = seqio.get_mixture_or_task("builtin_corpus_ul2")
  v = task.output_features["targets"].vocabulary
  modes = [v.encode(m) for m in ("[NLU] ", "[NLG] ", "[S2S] ")]
  exs = list(task.get_dataset({"inputs": 96, "targets": 96}, split="validation", shuffle=False,
                              seed=0, num_epochs=1).take(50).as_numpy_iterator())
  assert len(exs) == 50
  for ex in exs:
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    assert (ex["inputs"][:-1] != 1).all() and (ex["targets"][:-1] != 1).all()
    assert any(list(ex["inputs"][:len(m)]) == m for m in modes)


def test_source_shards_are_disjoint_and_cover():
  src = sources.stdlib_source("source")
  read = lambda shard: [ex["text"] for ex in src.get_dataset(
      "validation", shuffle=False, shard_info=shard).as_numpy_iterator()]
  full = read(None)
  parts = [read(seqio.ShardInfo(i, 3)) for i in range(3)]
  assert sorted(sum(parts, [])) == sorted(full)
  assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])


def test_inspect_unknown_name_lists_registered(capsys):
  assert inspect_data.main(["--mixture_or_task_name=no_such_task"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "builtin_mix" in err and "mix_ul2" in err


def test_inspect_bad_flag_exits_2_with_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    inspect_data.main(["--mixture_or_task_name=builtin_mix", "--task_feature_lengths=oops"])
  assert e.value.code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inspect_prints_modes_and_sentinels(capsys):
  assert inspect_data.main(["--mixture_or_task_name=builtin_corpus_ul2", "--num_examples=6",
                            "--split=validation", "--task_feature_lengths=inputs:64,targets:64",
                            "--max_chars=100000"]) == 0
  out = capsys.readouterr().out
  assert out.count("=== example") == 6 and "</s>" in out
  assert "[S2S]" in out or "[NLU]" in out or "[NLG]" in out
  assert "<extra_id_0>" in out or "[S2S]" in out
  assert np.sum([line.startswith("--- targets") for line in out.splitlines()]) == 6
  assert os.environ.get("TF_CPP_MIN_LOG_LEVEL")


def test_raw_c4_train_skips_the_held_out_validation_documents(tmp_path):
  """OpenMoE trained on train[:-2000] and validated on train[-2000:]: disjoint splits."""
  root = tmp_path / "rp" / "c4"
  root.mkdir(parents=True)
  for f in range(2):
    (root / f"c4-{f}.jsonl").write_text("\n".join(
        json.dumps({"text": f"file {f} doc {i}."}) for i in range(2100 if f else 50)))
  gin.bind_parameter("tasks.sources.data_dirs.redpajama_dir", str(tmp_path / "rp"))
  src = sources.file_or_tfds_source(
      "raw_c4_split_test", "redpajama_dir", "c4", ("*.jsonl",), "redpajama_c4:1.0.0", "text",
      {"train": "train[:-2000]", "validation": "train[-2000:]"})
  docs = {s: [ex["text"] for ex in src.get_dataset(s, shuffle=False).as_numpy_iterator()]
          for s in ("train", "validation")}
  assert len(docs["validation"]) == 2000 and len(docs["train"]) == 150
  assert not set(docs["train"]) & set(docs["validation"])
  assert b"file 1 doc 2000." in docs["train"] and b"file 1 doc 0." in docs["validation"]


def test_full_lm_rows_end_as_append_eos_after_trim_makes_them():
  """T5's full_lm task (OpenMoE's tasks, the default of common.add_task): full rows are 63
  tokens of the stream + EOS (the 64th is dropped). The built-in quick-start tasks keep every
  target token: the same stream, the 64th token instead of EOS."""
  from openmoe_jax.data import vocab
  from tasks import common, sources
  common.add_task("test_corpus_full_lm_t5", sources.stdlib_source("source"), "full_lm",
                  vocab.builtin_vocabulary())
  t5_task = seqio.get_mixture_or_task("test_corpus_full_lm_t5")
  ours = seqio.get_mixture_or_task("builtin_corpus_full_lm")
  eos = t5_task.output_features["targets"].vocabulary.eos_id
  take = lambda task: list(task.get_dataset({"targets": 64}, shuffle=False, seed=0,
                                            num_epochs=1).take(20).as_numpy_iterator())
  rows, kept = take(t5_task), take(ours)
  assert rows and all(len(r["targets"]) <= 64 and r["targets"][-1] == eos for r in rows)
  assert sum(len(r["targets"]) == 64 for r in rows) >= 10
  for a, b in zip(rows, kept):
    assert len(a["targets"]) == len(b["targets"])
    np.testing.assert_array_equal(a["targets"][:-1], b["targets"][:-1])
  assert any(b["targets"][-1] != eos for b in kept)


def test_a_source_that_gives_no_example_is_one_line_naming_what_was_skipped(monkeypatch):
  """An empty JSONL file, or one whose lines all lack the task's field: the first batch is one
  line saying so, with the skipped documents by kind, not 'StopIteration'."""
  from openmoe_jax.data import pipeline
  from openmoe_jax.errors import UsageError
  stats = corpus.DocumentStats()
  stats.add("missing_field", 2)
  monkeypatch.setattr(corpus, "SOURCE_STATS", {"no_field_test": stats})

  def exhausted(self):
    raise StopIteration

  monkeypatch.setattr(pipeline.ShardedIterator, "__next__", exhausted)
  it = pipeline.ShardedIterator.__new__(pipeline.ShardedIterator)
  with pytest.raises(UsageError, match=r"my_task gives no training example: .*\b2 missing field"):
    it.check_first_batch("my_task", {"targets": 32})
