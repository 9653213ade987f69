"""openmoe-infer and metric-based openmoe-eval on a tiny checkpoint: outputs, parity with the
exported PyTorch model (greedy tokens, multiple-choice log-likelihoods), bad input."""
import json

import numpy as np
import pytest

from run_dirs import make_run_dir
from openmoe_jax.commands import infer
from test_export import CFG, STEP

PROMPTS = ["def add(a, b):", "Return the value", "import os", "class A(object):"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("infer") / "run", CFG, step=STEP, seed=2, run={'mixture_or_task_name': 'builtin_corpus_full_lm', 'task_feature_lengths': {'targets': 64}})


def _infer(run_dir, tmp_path, *flags, lines=PROMPTS, name="in.txt"):
  inp, out = tmp_path / name, tmp_path / "out.jsonl"
  if lines is not None:
    inp.write_text("".join(l + "\n" for l in lines) if isinstance(lines, list) else lines)
  code = infer.main([f"--model_dir={run_dir}", f"--input_file={inp}", f"--output_file={out}",
                     *flags])
  rows = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else None
  return code, rows


def test_greedy_output_rows_and_batch_independence(run_dir, tmp_path, capsys):
  code, rows = _infer(run_dir, tmp_path, "--max_new_tokens=6", "--no_drop", "--batch_size=3")
  assert code == 0
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(str(tmp_path / "out.jsonl"))
  assert [r["prompt"] for r in rows] == PROMPTS
  from openmoe_jax.data import vocab
  voc = vocab.builtin_vocabulary()
  for r in rows:
    assert set(r) == {"prompt", "completion", "completion_ids", "log_probs", "finish"}
    assert len(r["completion_ids"]) == len(r["log_probs"]) <= 6
    assert r["completion"] == voc.decode(r["completion_ids"])
  # Batch 1, with the model setting given the t5x way instead of --no_drop: the same tokens.
  _, one_by_one = _infer(run_dir, tmp_path, "--max_new_tokens=6", "--gin.NO_DROP=True",
                         "--batch_size=1")
  assert [r["completion_ids"] for r in one_by_one] == [r["completion_ids"] for r in rows]
  assert not (tmp_path / "out.jsonl.tmp").exists()


def test_greedy_tokens_equal_exported_generate(run_dir, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from openmoe_jax.commands import export as export_cmd
  from test_export import _torch_model
  hf = tmp_path / "hf"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={hf}"]) == 0
  code, rows = _infer(run_dir, tmp_path, "--max_new_tokens=10", "--no_drop", "--batch_size=4")
  assert code == 0
  model = _torch_model(hf, router_no_drop=True)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
  for row in rows:
    ids = tok(row["prompt"], return_tensors="pt").input_ids  # [BOS=0] + prompt
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, eos_token_id=1, pad_token_id=0)[0, ids.shape[1]:]
    want = out.tolist()
    if 1 in want:
      want = want[:want.index(1)]
    assert row["completion_ids"] == want
    with torch.no_grad():  # log-probs too: the HF model's on the same sequence
      seq = torch.cat([ids[0], torch.tensor(row["completion_ids"], dtype=torch.long)])[None]
      logp = torch.log_softmax(model(seq).logits[0, ids.shape[1] - 1:-1], -1)
      hf_lp = logp[torch.arange(len(row["completion_ids"])), seq[0, ids.shape[1]:]].numpy()
    np.testing.assert_allclose(row["log_probs"], hf_lp, atol=2e-4)


def test_chat_template_and_eos_text(run_dir, tmp_path):
  from openmoe_jax.data import chat
  from openmoe_jax.data import vocab
  voc = vocab.builtin_vocabulary()
  ids = chat.prompt_ids(voc, "hi", "be brief")
  assert ids.count(0) == 1  # the template's inner BOS; decoding adds the leading one
  assert voc.decode(ids[:ids.index(0)]) == "<<SYS>>\nbe brief\n<</SYS>>\n\n"
  assert voc.decode(ids[ids.index(0) + 1:]) == "[INST] hi [/INST]"
  stop = list(voc.encode("a</s>"))[1:]
  assert tuple(stop) in chat.stop_sequences(voc)
  text, kept, lp = chat.cut_at_eos_text(voc, list(voc.encode("ok then")) + stop + [7],
                                        [0.0] * 9)
  assert text == "ok then" and voc.decode(kept) == "ok then" and len(lp) == len(kept)
  code, rows = _infer(run_dir, tmp_path, "--max_new_tokens=4", "--chat_template", lines=["hi"])
  assert code == 0 and "</s>" not in rows[0]["completion"]


def test_sampling_flags_and_jsonl_input(run_dir, tmp_path):
  lines = [json.dumps({"prompt": p}) for p in PROMPTS[:2]]
  flags = ("--max_new_tokens=5", "--temperature=0.9", "--top_k=40", "--top_p=0.9")
  _, a = _infer(run_dir, tmp_path, *flags, "--seed=3", lines=lines, name="in.jsonl")
  _, b = _infer(run_dir, tmp_path, *flags, "--seed=3", lines=lines, name="in.jsonl")
  _, c = _infer(run_dir, tmp_path, *flags, "--seed=4", lines=lines, name="in.jsonl")
  assert [r["prompt"] for r in a] == PROMPTS[:2]
  assert a == b and [r["completion_ids"] for r in a] != [r["completion_ids"] for r in c]


def test_beam_search_flags(run_dir, tmp_path):
  flags = ("--max_new_tokens=5", "--no_drop", "--batch_size=3")
  _, greedy = _infer(run_dir, tmp_path, *flags)
  _, one = _infer(run_dir, tmp_path, *flags, "--num_beams=1", "--length_penalty_alpha=2")
  assert one == greedy  # --num_beams=1 (the default) is the decoding of before, alpha unused
  code, beams = _infer(run_dir, tmp_path, *flags, "--num_beams=3")
  assert code == 0 and [r["prompt"] for r in beams] == PROMPTS
  from openmoe_jax.data import vocab
  voc = vocab.builtin_vocabulary()
  for r in beams:
    assert set(r) == {"prompt", "completion", "completion_ids", "log_probs", "finish"}
    assert len(r["completion_ids"]) == len(r["log_probs"]) <= 5
    assert r["completion"] == voc.decode(r["completion_ids"])
  # EOS is 1 token in 8192 to this random model: every completion has 5 tokens, so the beams'
  # summed log-probs are no worse than greedy's (true of this model, not of beam search).
  assert all(r["finish"] == "length" for r in beams + greedy)
  for b, g in zip(beams, greedy):
    assert sum(b["log_probs"]) >= sum(g["log_probs"]) - 1e-4


def _error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith("openmoe-infer: error: "), err
  return err[-1]


@pytest.mark.parametrize("case,flags,lines,message", [
    ("too long", ["--max_new_tokens=60"], ["x " * 10], "in.txt:1: prompt of"),
    ("empty", [], "", "has no prompts"),
    ("not utf-8", [], b"ok\n\xff\xfe bad\n", "in.txt:2: not valid UTF-8"),
    ("no step", ["--step=99"], PROMPTS, "no checkpoint for step 99"),
    ("bad top_p", ["--temperature=1", "--top_p=0"], PROMPTS, "top_p"),
    ("beams and sampling", ["--num_beams=4", "--temperature=0.7"], PROMPTS,
     "--num_beams > 1 is a deterministic search"),
    ("beams and top_k", ["--num_beams=2", "--top_k=5"], PROMPTS, "--num_beams > 1"),
    ("no beams", ["--num_beams=0"], PROMPTS, "--num_beams must be >= 1"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(run_dir, tmp_path, capsys, case, flags,
                                                    lines, message):
  inp = tmp_path / "in.txt"
  if isinstance(lines, bytes):
    inp.write_bytes(lines)
    lines = None
  code, rows = _infer(run_dir, tmp_path, *flags, lines=lines)
  assert code == 2 and rows is None, case
  assert message in _error(capsys), case
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_task_prompts_and_a_task_without_inputs(run_dir, tmp_path, capsys):
  out = tmp_path / "o.jsonl"
  args = [f"--model_dir={run_dir}", f"--output_file={out}", "--max_new_tokens=3"]
  assert infer.main(args + ["--mixture_or_task_name=builtin_function_name",
                            "--num_examples=3"]) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 3 and all(r["prompt"].endswith("\ndef") and r["target"] for r in rows)
  out.unlink()
  assert infer.main(args + ["--mixture_or_task_name=builtin_corpus_full_lm"]) == 2
  assert "no 'inputs' feature" in _error(capsys)
  assert not out.exists()
