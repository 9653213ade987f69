"""Metric-based evaluation: metric functions against hand-worked references, few-shot prompts,
the downstream tasks' readers, openmoe-eval on eval tasks, and multiple-choice log-likelihoods
equal to the exported PyTorch model's."""
import itertools
import json
import math

import numpy as np
import pytest

import tasks  # noqa: F401
from openmoe_jax.evaluation import downstream
from openmoe_jax.commands import evaluate
from openmoe_jax.evaluation import likelihood
from openmoe_jax.evaluation import metrics
from openmoe_jax.data import vocab
from openmoe_jax.gin_utils import UsageError
from tasks import downstream as openmoe_tasks
from test_infer import run_dir  # noqa: F401  (fixture)


def test_exact_match_and_f1_follow_squad_normalisation():
  targets = [["The Eiffel Tower", "Eiffel tower"], "Paris", "blue whale"]
  predictions = ["eiffel tower.", "paris, France", "the whale"]
  assert metrics.exact_match(targets, predictions)["exact_match"] == pytest.approx(100 / 3)
  # F1: 1.0 (alias match); paris vs paris france: P=1/2 R=1 -> 2/3; whale vs blue whale -> 2/3.
  assert metrics.f1(targets, predictions)["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)


def test_pass_at_k_estimator_equals_counting_subsets():
  for n, c, k in [(5, 2, 1), (5, 2, 2), (6, 0, 3), (4, 4, 2), (7, 3, 4)]:
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    want = sum(any(s) for s in subsets) / len(subsets)
    assert metrics.pass_at_k_estimate(n, c, k) == pytest.approx(want)
  got = metrics.pass_at_k((1, 2))(None, [[True, False], [False, False], [True, True]])
  assert got == {"pass@1": pytest.approx(100 * (0.5 + 0 + 1) / 3),
                 "pass@2": pytest.approx(100 * 2 / 3)}


def test_multiple_choice_with_and_without_length_normalisation():
  scores = [[(-4.0, 2), (-6.0, 10)],   # acc picks 0; per char -2.0 vs -0.6 picks 1
            [(-1.0, 5), (-3.0, 5)]]    # both pick 0
  assert metrics.multiple_choice([1, 0], scores) == {"accuracy": 50.0, "accuracy_norm": 100.0}


def test_fewshot_prefixes_are_seeded_and_exclude_the_example():
  pool = [{"inputs": f"q{i}:", "targets": f" a{i}"} for i in range(6)]
  a = downstream.fewshot_prefixes(pool[:2], pool, 3, seed=1, separator="\n")
  assert a == downstream.fewshot_prefixes(pool[:2], pool, 3, seed=1, separator="\n")
  assert a != downstream.fewshot_prefixes(pool[:2], pool, 3, seed=2, separator="\n")
  assert "q0:" not in a[0] and a[0].count("\n") == 3 and "q1: a1\n" not in a[1]
  with pytest.raises(UsageError, match="few-shot split has 5"):
    downstream.fewshot_prefixes(pool[:1], pool, 6, seed=0, separator="\n")


def test_builtin_tasks_are_deterministic_and_well_formed():
  names = downstream.read_examples("builtin_function_name", "validation", 50)
  assert len(names) == 50 and all(e["inputs"].endswith("\ndef") for e in names)
  assert all(e["answers"] == [e["targets"].replace("_", " ").strip()] for e in names)
  assert all(e["targets"].startswith(" ") for e in names)
  lines = downstream.read_examples("builtin_next_line", "validation", 40)
  assert lines == downstream.read_examples("builtin_next_line", "validation", 40)
  for e in lines:
    assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4 and 0 <= e["label"] < 4
    indents = {c[:len(c) - len(c.lstrip())] for c in e["choices"]}
    assert len(indents) == 1  # distractors re-indented: whitespace gives nothing away
  assert {e["label"] for e in lines} == {0, 1, 2, 3}


def test_local_openmoe_task_readers(tmp_path, monkeypatch):
  (tmp_path / "mmlu" / "val").mkdir(parents=True)
  (tmp_path / "mmlu" / "val" / "astronomy_val.csv").write_text('What is 2+2?,3,4,5,6,B\n')
  (tmp_path / "tqa").mkdir()
  (tmp_path / "tqa" / "validation.jsonl").write_text(
      json.dumps({"question": "Capital of France?", "answers": ["Paris", "paris"]}) + "\n")
  monkeypatch.setenv("OPENMOE_MMLU_DIR", str(tmp_path / "mmlu"))
  monkeypatch.setenv("OPENMOE_TRIVIAQA_DIR", str(tmp_path / "tqa"))
  [mc] = downstream.read_examples("mmlu", "validation")
  assert mc["label"] == 1 and mc["choices"] == [" A", " B", " C", " D"]
  assert mc["inputs"].endswith("A. 3\nB. 4\nC. 5\nD. 6\nAnswer:") and "astronomy" in mc["inputs"]
  [qa] = downstream.read_examples("triviaqa", "validation")
  assert qa["inputs"] == "Question: Capital of France?\nAnswer:" and qa["answers"] == ["Paris", "paris"]
  with pytest.raises(UsageError, match=r"no data for mmlu: .*test/\*\.csv not found"):
    downstream.read_examples("mmlu", "test")


def test_humaneval_hook_runs_tests_only_when_allowed(monkeypatch):
  ex = {"inputs": "def inc(x):\n", "test": "def check(f):\n    assert f(1) == 2\n",
        "entry_point": "inc"}
  monkeypatch.delenv("OPENMOE_ALLOW_CODE_EXECUTION", raising=False)
  with pytest.raises(UsageError, match="OPENMOE_ALLOW_CODE_EXECUTION"):
    openmoe_tasks.run_humaneval_tests(ex, "    return x + 1\n")
  monkeypatch.setenv("OPENMOE_ALLOW_CODE_EXECUTION", "1")
  assert openmoe_tasks.run_humaneval_tests(ex, "    return x + 1\n")
  assert not openmoe_tasks.run_humaneval_tests(ex, "    return x\n")
  assert openmoe_tasks.humaneval_postprocess("    return 1\ndef other():\n") == "    return 1"


def test_split_pair_keeps_running_text_tokenization():
  voc = vocab.builtin_vocabulary()
  ctx, cont = likelihood.split_pair(voc, "def f(x):\n", "    return x")
  assert ctx + cont == list(voc.encode("def f(x):\n    return x"))
  assert ctx == list(voc.encode("def f(x):\n")) and len(cont) >= 2
  # Encoded on its own the line would start with an extra word-start space.
  assert list(voc.encode("    return x")) != cont


def test_choice_log_likelihoods_equal_exported_model(run_dir, tmp_path):  # noqa: F811
  torch = pytest.importorskip("torch")
  from openmoe_jax.training import checkpoint
  from openmoe_jax.interop import hf_export as export
  from openmoe_jax.commands import export as export_cmd
  from openmoe_jax.training import run_dir as run_dir_lib
  from test_export import _torch_model
  cfg = run_dir_lib.load_model_config(str(run_dir), ["no_drop=true"])
  params = checkpoint.restore_params(str(run_dir))
  voc = vocab.builtin_vocabulary()
  examples = downstream.read_examples("builtin_next_line", "validation", 6)
  contexts, choices = [e["inputs"] for e in examples], [e["choices"] for e in examples]
  got = likelihood.choice_scores(params, cfg, voc, contexts, choices, budget=64, batch_size=8)
  hf = tmp_path / "hf"
  assert export_cmd.main([f"--model_dir={run_dir}", f"--output_dir={hf}"]) == 0
  model = _torch_model(hf, router_no_drop=True)
  for ctx_text, options, scores in zip(contexts, choices, got):
    want = []
    for option in options:
      ctx, cont = likelihood.split_pair(voc, ctx_text, option)
      ctx = ctx[max(len(ctx) - (64 - len(cont)), 0):]
      ids = torch.tensor([[0] + ctx + cont])
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
      want.append(float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(ctx):].sum()))
    np.testing.assert_allclose([s for s, _ in scores], want, atol=1e-3)
    assert int(np.argmax([s for s, _ in scores])) == int(np.argmax(want))


def _eval(run_dir, *bindings):  # noqa: F811
  return evaluate.main([f"--gin.MODEL_DIR='{run_dir}'", "--gin.BATCH_SIZE=8", *bindings])


def test_openmoe_eval_reports_task_metrics_json_and_tensorboard(run_dir, capsys):  # noqa: F811
  assert _eval(run_dir, "--gin.MIXTURE_OR_TASK_NAME='builtin_next_line'",
               "--gin.NUM_EXAMPLES=8", "--gin.NUM_SHOTS=1", "--gin.EVAL_NO_DROP=True") == 0
  res = json.loads(capsys.readouterr().out)
  assert res["step"] == 3 and res["num_shots"] == 1
  assert res["builtin_next_line/num_examples"] == 8
  for key in ("builtin_next_line/accuracy", "builtin_next_line/accuracy_norm"):
    assert 0 <= res[key] <= 100 and math.isclose(res[key] * 8 / 100, round(res[key] * 8 / 100))
  assert _eval(run_dir, "--gin.MIXTURE_OR_TASK_NAME='builtin_function_name'",
               "--gin.NUM_EXAMPLES=4") == 0
  res = json.loads(capsys.readouterr().out)
  assert {"builtin_function_name/exact_match", "builtin_function_name/f1"} <= set(res)
  rows = [json.loads(l) for l in (run_dir / "eval_results.jsonl").read_text().splitlines()]
  assert rows[-1] == res
  assert list((run_dir / "tensorboard" / "inference_eval").iterdir())


def test_openmoe_eval_bad_input_is_one_line(run_dir, capsys, monkeypatch):  # noqa: F811
  monkeypatch.delenv("OPENMOE_MMLU_DIR", raising=False)
  assert _eval(run_dir, "--gin.MIXTURE_OR_TASK_NAME='mmlu'") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("openmoe-eval: error: no data for mmlu: set "
                     "tasks.downstream.eval_data_dirs.mmlu_dir or $OPENMOE_MMLU_DIR")
  # A task whose examples lack what its metric needs.
  downstream.register_task("test_mc_without_choices", openmoe_tasks._source(  # pylint: disable=protected-access
      lambda split: [{"inputs": "x", "targets": "y", "answers": ["y"]}],
      ("inputs", "targets", "answers"), ("validation",)),
      vocab.builtin_vocabulary(), [metrics.multiple_choice])
  assert _eval(run_dir, "--gin.MIXTURE_OR_TASK_NAME='test_mc_without_choices'") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "lacks the feature(s) choices, label its score metrics need" in err[-1]


# --------------------------------------------------------------------------- sampled pass@k
def _comb_reference(n: int, c: int, k: int) -> float:
  """pass@k = 1 - C(n-c, k) / C(n, k), with exact integer binomials, as a float64."""
  return float(np.float64(1) - np.float64(math.comb(n - c, k)) / np.float64(math.comb(n, k)))


def test_pass_at_k_estimator_equals_the_binomial_formula_in_float64():
  cases = [(n, c, k) for n in range(1, 31) for c in range(n + 1) for k in range(1, n + 1)]
  cases += [(200, c, k) for c in (0, 1, 2, 7, 50, 150, 199, 200) for k in (1, 10, 100)]
  for n, c, k in cases:
    assert metrics.pass_at_k_estimate(n, c, k) == pytest.approx(_comb_reference(n, c, k),
                                                                rel=1e-12, abs=1e-12), (n, c, k)
  # Reported for the ks every example has samples for: n = 10 gives pass@1 and pass@10 only.
  results = [[True] + [False] * 9, [False] * 10, [True] * 3 + [False] * 7]
  got = metrics.pass_at_k((1, 10, 100))(None, results)
  assert got == {"pass@1": pytest.approx(100 * (0.1 + 0 + 0.3) / 3),
                 "pass@10": pytest.approx(100 * 2 / 3)}
  assert metrics.pass_at_k((1, 10, 100))(None, [[True], [False]]) == {"pass@1": 50.0}


def _hook_task(name: str, calls: list):
  """A predict task of 3 prompts whose execute hook passes a completion containing 'e'."""
  rows = [{"inputs": p, "targets": ""} for p in ("def add(a, b):", "import os", "class A:")]

  def execute(example, completion):
    calls.append((example["inputs"], completion))
    return "e" in completion
  downstream.register_task(
      name, openmoe_tasks._source(lambda split: rows, ("inputs", "targets"), ("validation",)),  # pylint: disable=protected-access
      vocab.builtin_vocabulary(), [metrics.pass_at_k((1, 10, 100))],
      downstream.EvalSpec(max_new_tokens=4, stop_at_newline=False, execute=execute))


@pytest.fixture(scope="module")
def tiny_params():
  import jax
  import jax.numpy as jnp
  from openmoe_jax.model import partitioning
  from openmoe_jax.model.transformer import Transformer
  from test_export import CFG
  cfg = CFG.replace(no_drop=True)
  return cfg, partitioning.unbox(
      Transformer(cfg).init(jax.random.key(5), jnp.ones((1, 8), jnp.int32))["params"])


def _spy_generate(monkeypatch):
  from openmoe_jax.evaluation import decoding
  seen, real = [], decoding.generate

  def spy(*args, **kwargs):
    seen.append(kwargs)
    return real(*args, **kwargs)
  monkeypatch.setattr(decoding, "generate", spy)
  return seen


def test_sampled_pass_at_k_draws_n_samples_with_distinct_keys(tiny_params, monkeypatch):
  import jax
  from openmoe_jax.evaluation import decoding
  cfg, params = tiny_params
  calls = []
  _hook_task("test_sampled_pass_at_k", calls)
  seen = _spy_generate(monkeypatch)
  res = downstream.evaluate_task(params, cfg, "test_sampled_pass_at_k", split="validation",
                                 budget=32, batch_size=4, num_samples=10, temperature=1.0,
                                 top_p=0.95, sample_seed=3)
  # One decoding pass per sample, each with its own key fold_in(key(3), j).
  assert len(seen) == 10
  assert all(kw["sampling"] == decoding.Sampling(temperature=1.0, top_p=0.95) for kw in seen)
  keys = [tuple(np.asarray(jax.random.key_data(kw["rng"])).ravel()) for kw in seen]
  assert len(set(keys)) == 10
  assert keys == [tuple(np.asarray(jax.random.key_data(
      jax.random.fold_in(jax.random.key(3), j))).ravel()) for j in range(10)]
  # The hook ran on every sample of every prompt; the samples differ.
  by_prompt = {}
  for prompt, completion in calls:
    by_prompt.setdefault(prompt, []).append(completion)
  assert sorted(len(v) for v in by_prompt.values()) == [10, 10, 10]
  assert all(len(set(v)) > 1 for v in by_prompt.values())
  passed = [sum("e" in c for c in v) for v in by_prompt.values()]
  assert set(res) == {"pass@1", "pass@10", "num_examples"}  # no pass@100 from 10 samples
  assert res["pass@1"] == pytest.approx(100 * np.mean([c / 10 for c in passed]))
  assert res["pass@10"] == pytest.approx(100 * np.mean([c > 0 for c in passed]))
  assert res["num_examples"] == 3


def test_default_pass_at_k_is_one_greedy_sample(tiny_params, monkeypatch):
  from openmoe_jax.evaluation import decoding
  cfg, params = tiny_params
  calls = []
  _hook_task("test_greedy_pass_at_k", calls)
  seen = _spy_generate(monkeypatch)
  res = downstream.evaluate_task(params, cfg, "test_greedy_pass_at_k", split="validation",
                                 budget=32, batch_size=4)
  assert len(seen) == 1 and seen[0]["sampling"] == decoding.Sampling() and seen[0]["rng"] is None
  assert set(res) == {"pass@1", "num_examples"}
  # The completions are plain greedy decoding, as before sampling existed.
  voc = vocab.builtin_vocabulary()
  prompts = ["def add(a, b):", "import os", "class A:"]
  greedy = decoding.generate(params, cfg, [list(voc.encode(p)) for p in prompts],
                             max_new_tokens=4, batch_size=4)
  assert [c for _, c in calls] == [voc.decode(g.ids) for g in greedy]
  assert res["pass@1"] == pytest.approx(100 * np.mean(["e" in c for _, c in calls]))


def test_sampling_settings_are_checked(tiny_params):
  cfg, params = tiny_params
  _hook_task("test_greedy_pass_at_k", [])
  kw = dict(split="validation", budget=32)
  with pytest.raises(UsageError, match="NUM_SAMPLES=4 needs TEMPERATURE > 0"):
    downstream.evaluate_task(params, cfg, "test_greedy_pass_at_k", num_samples=4, **kw)
  with pytest.raises(UsageError, match="TOP_P must be in"):
    downstream.evaluate_task(params, cfg, "test_greedy_pass_at_k", temperature=0.8, top_p=0.0,
                             **kw)
  with pytest.raises(UsageError, match="builtin_function_name has no execution hook"):
    downstream.evaluate_task(params, cfg, "builtin_function_name", num_samples=2,
                             temperature=0.8, **kw)


def test_openmoe_eval_samples_for_pass_at_k(run_dir, capsys):  # noqa: F811
  _hook_task("test_eval_pass_at_k", [])
  binding = "--gin.openmoe_jax.evaluate.evaluate_checkpoint."
  assert _eval(run_dir, "--gin.MIXTURE_OR_TASK_NAME='test_eval_pass_at_k'",
               f"{binding}num_samples=10", f"{binding}temperature=0.8",
               f"{binding}sample_seed=1") == 0
  res = json.loads(capsys.readouterr().out)
  assert {"test_eval_pass_at_k/pass@1", "test_eval_pass_at_k/pass@10"} <= set(res)
  assert "test_eval_pass_at_k/pass@100" not in res
  assert (res["num_samples"], res["temperature"], res["top_p"], res["sample_seed"]) == (
      10, 0.8, 1.0, 1)
