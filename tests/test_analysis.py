"""Routing analysis: measurements on constructed routers with known answers, and the CLI."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.evaluation import routing_stats as analysis
from openmoe_jax.evaluation import routing_report
from openmoe_jax.model import routing
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer
from test_train import _run

ROOT = pathlib.Path(__file__).resolve().parent.parent
E, V, B, L, K = 8, 64, 16, 64, 2


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, V, size=(B, L))
  return ids, np.broadcast_to(np.arange(L), (B, L)), np.ones((B, L), bool)


def _route(logits, capacity):
  """Routes logits [B, L, E] in one group per row, left to right, as the MoE layer does."""
  r = routing.top_k_routing(jnp.asarray(logits, jnp.float32), K, capacity)
  return np.asarray(r.expert_index), np.asarray(r.kept)


def _counters(ids, positions, real, expert_index, kept=None, cf=1.0, bins=8):
  c = analysis.RoutingCounters(V, E, L, bins)
  for _ in range(8):  # the same batch several times: enough occurrences per token ID
    c.add_choices(ids, positions, expert_index, real)
    if kept is not None:
      c.add_drops(cf, kept, real)
  return c


def test_token_id_only_router_gives_full_specialisation():
  ids, pos, real = _tokens()
  logits = 10.0 * np.eye(E)[ids % E] + 5.0 * np.eye(E)[(ids + 1) % E]
  index, _ = _route(logits, L)
  c = _counters(ids, pos, real, index)
  tok = analysis.specialisation(c.token_top1, min_count=16)
  assert tok["num_ids"] > 50 and tok["top1_share"] == 1.0
  np.testing.assert_allclose(tok["routing_std"], np.sqrt(E - 1) / E)
  assert tok["uniform_top1_share"] < 0.6
  # Every position sees many token IDs, so position IDs look far less specialised.
  assert analysis.specialisation(c.position_top1, 16)["top1_share"] < 0.5
  top = analysis.top_tokens_per_expert(c.token_top1, num=3)
  assert all(t["share"] == 1.0 and t["id"] % E == e for e, ts in enumerate(top) for t in ts)


def test_uniform_random_router_gives_the_baseline():
  ids, pos, real = _tokens(1)
  c = analysis.RoutingCounters(V, E, L, 8)
  rng = np.random.default_rng(2)
  for _ in range(20):
    index, _ = _route(rng.normal(size=(B, L, E)), L)
    c.add_choices(ids, pos, index, real)
  tok = analysis.specialisation(c.token_top1, min_count=100)
  assert tok["num_ids"] > 50
  np.testing.assert_allclose(tok["top1_share"], tok["uniform_top1_share"], rtol=0.05)
  np.testing.assert_allclose(tok["routing_std"], tok["uniform_routing_std"], rtol=0.1)
  assert analysis.load_cv(c.load) < 0.05


def test_overloaded_expert_drops_rise_with_position_and_vanish_without_capacity_limit():
  ids, pos, real = _tokens(3)
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(B, L, E))
  logits[..., 0] += 4.0 * (rng.random((B, L)) < 0.6)  # expert 0 is the first choice of 60%
  cap = routing.expert_capacity(L, E, 1.25, num_selected_experts=K)
  index, kept = _route(logits, cap)
  c = _counters(ids, pos, real, index, kept, cf=1.25)
  d = analysis.summarise(c, min_count=16, top_tokens=None)["drops"]["1.25"]
  first = d["first_choice_by_position_bin"]
  assert first[0] == 0.0 and first[-1] > 0.4
  assert np.mean(first[4:]) > np.mean(first[:4]) + 0.2  # rising towards the end
  assert d["by_position_bin"][-1] > d["by_position_bin"][0]
  no_drop = routing.expert_capacity(L, E, 1.25, no_drop=True)
  index, kept = _route(logits, no_drop)
  c = _counters(ids, pos, real, index, kept, cf=1.25)
  d = analysis.summarise(c, min_count=16, top_tokens=None)["drops"]["1.25"]
  assert d["dropped_fraction"] == 0.0 and set(d["by_position_bin"]) == {0.0}


@pytest.mark.parametrize("mode,order,router", [
    ("fixed", "openmoe", "tokens_choose"), ("dropless", "openmoe", "tokens_choose"),
    ("adaptive", "confidence", "tokens_choose"), ("fixed", "openmoe", "experts_choose")])
def test_captured_routing_matches_the_model_and_identical_checkpoints_agree(mode, order, router):
  """The analysis re-routes with the model's own capacity mode and order, so its drops are the
  model's drops (none for dropless; under expert choice, tokens no expert took, as the model's
  moe/dropped_fraction, and load = picks)."""
  cfg = ModelConfig(vocab_size=V, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                    expert_mlp_dim=24, num_layers=2, num_experts=4, num_sparse_layers=1,
                    eval_capacity_factor=1.0, group_size=64, capacity_mode=mode,
                    capacity_order=order, router=router)
  ids, pos, _ = _tokens(5)
  batch = {"decoder_input_tokens": np.pad(ids[:, 1:], ((0, 0), (1, 0))),
           "decoder_target_tokens": ids, "decoder_positions": np.asarray(pos)}
  params = Transformer(cfg).init(jax.random.key(0), jnp.asarray(ids))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  _, metrics = Transformer(cfg).apply({"params": params}, batch["decoder_input_tokens"],
                                      batch["decoder_target_tokens"])
  copy = jax.tree.map(np.array, params)  # a second, identical checkpoint
  [layer], [again] = (routing_report.collect(cfg, p, [batch], [1.0], 1.0, 4) for p in (params, copy))
  np.testing.assert_allclose(layer.dropped[1.0].sum() / layer.assigned[1.0].sum(),
                             float(metrics.dropped_fraction[0]), atol=1e-6)
  # jit vs eager float rounding may flip a near-tie second choice: allow two of 2048 assignments.
  np.testing.assert_allclose(analysis.load_share(layer.load), metrics.expert_load[0], atol=1e-3)
  agree = analysis.top1_agreement(layer.token_top1, again.token_top1)
  assert agree["num_ids"] > 50 and agree["agreement"] == agree["weighted_agreement"] == 1.0
  if router == "experts_choose":
    assert layer.dropped[1.0].sum() > 0  # C = T / E: some tokens are left to no expert
    assert layer.token_top1.sum() == layer.num_tokens - layer.tokens_not_taken


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("analysis") / "run"
  r = _run(d, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=1")
  assert r.returncode == 0, r.stderr[-2000:]
  return d


def _analyze(*args):
  return subprocess.run([sys.executable, "-m", "openmoe_jax.analyze", *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_writes_report_and_png_figures(model_dir, tmp_path):
  out = tmp_path / "out"
  r = _analyze(f"--model_dir={model_dir}", "--steps=1,2", "--num_tokens=600", "--seq_len=32",
               "--batch_size=8", "--min_count=4", "--capacity_factors=1.0,2.0",
               "--mixture_or_task_name=builtin_docstrings_full_lm",
               "--gin.ModelConfig.min_expert_capacity=2", f"--output_dir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads((out / "routing_report.json").read_text())
  s = rep["settings"]
  assert s["steps"] == [1, 2] and s["capacity_factors"] == [1.0, 2.0]
  assert s["tasks"] == ["builtin_docstrings_full_lm"]
  assert s["num_tokens_requested"] == 600 and s["model_overrides"] == ["min_expert_capacity=2"]
  layers = [str(l) for l in s["moe_layers"]]
  for step in ("1", "2"):
    for task in s["tasks"]:
      for l in layers:
        m = rep["checkpoints"][step]["tasks"][task]["layers"][l]
        assert m["num_tokens"] >= 600 and abs(sum(m["expert_load"]) - 1) < 1e-6
        assert m["expert_load_cv"] >= 0 and set(m["drops"]) == {"1.0", "2.0"}
        assert len(m["drops"]["1.0"]["by_position_bin"]) == s["position_bins"]
        assert m["token_id_specialisation"]["top1_share"] is not None
  top = rep["checkpoints"]["2"]["all_tasks"]["layers"][layers[0]]["top_tokens_per_expert"]
  assert len(top) == s["num_experts"] and any(isinstance(t["token"], str) for e in top for t in e)
  for l in layers:
    assert rep["early_routing"]["layers"][l]["2"]["agreement"] == 1.0
    assert 0 <= rep["early_routing"]["layers"][l]["1"]["agreement"] <= 1
  assert sorted(rep["figures"]) == ["drops_by_position.png", "early_routing.png",
                                    "expert_load.png", "specialisation.png"]
  for name in rep["figures"]:
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_usage_errors(model_dir, tmp_path):
  for args, needle in ((["--steps=7"], "7"), (["--model_override=bogus=1"], "bogus"),
                       (["--num_tokens=0"], "--num_tokens=0: must be a positive integer"),
                       (["--position_bins=-1"], "--position_bins=-1")):
    r = _analyze(f"--model_dir={model_dir}", f"--output_dir={tmp_path}", *args)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("openmoe-analyze: error:") and needle in last, last
  assert not (tmp_path / "routing_report.json").exists()


def _numpy_expert_choice(logits, capacity):
  """Expert choice from scratch: bool[G, T, E] expert e takes its `capacity` highest-softmax
  tokens of each group (ties to the lowest token index)."""
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  scores = z / z.sum(axis=-1, keepdims=True)
  g, t, e = scores.shape
  kept = np.zeros((g, t, e), bool)
  for gi in range(g):
    for ei in range(e):
      kept[gi, np.argsort(-scores[gi, :, ei], kind="stable")[:capacity], ei] = True
  return kept, scores


def test_cli_expert_choice_report_matches_a_numpy_recount(model_dir, tmp_path, monkeypatch):
  """An expert-choice model (the fixture's checkpoint read with ROUTER='experts_choose': the
  router has the same parameters): the report's not-taken fraction per position bin and its
  top-1 specialisation equal a from-scratch numpy routing of the captured router logits."""
  from flax import traverse_util
  from openmoe_jax.commands import analyze as analyze_cmd
  from openmoe_jax.data import pipeline as data
  from openmoe_jax.model.moe import Router
  from openmoe_jax.training import run_dir
  task, out, bins, min_count, num_tokens = "builtin_corpus_full_lm", tmp_path / "ec", 8, 4, 300
  pulled = []  # the batches the tool reads (one pipeline build instead of two)
  make_iterator = data.make_iterator
  def recording(*args, **kwargs):
    for batch in make_iterator(*args, **kwargs):
      pulled.append({k: np.asarray(v) for k, v in batch.items()})
      yield batch
  monkeypatch.setattr(data, "make_iterator", recording)
  assert analyze_cmd.main([f"--model_dir={model_dir}", "--steps=2", f"--num_tokens={num_tokens}",
                           "--seq_len=32", "--batch_size=8", f"--min_count={min_count}",
                           "--capacity_factors=1.0", f"--position_bins={bins}",
                           f"--mixture_or_task_name={task}", "--no_progress",
                           f"--output_dir={out}", "--gin.ROUTER='experts_choose'",
                           "--gin.ModelConfig.min_expert_capacity=2"]) == 0
  rep = json.loads((out / "routing_report.json").read_text())
  s = rep["settings"]
  assert s["router"] == "experts_choose" and s["tokens_per_group"] == 32
  assert s["expert_capacity"] == {"1.0": 4, "2.0": 8}  # round(cf * 32 / 8)
  cfg = run_dir.load_model_config(model_dir, {"router": "experts_choose",
                                              "min_expert_capacity": 2})
  params, _ = run_dir.load_params(model_dir, 2)

  @jax.jit
  def router_logits(batch):
    _, state = Transformer(cfg).apply(
        {"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        batch.get("decoder_segment_ids"), batch.get("decoder_positions"), deterministic=True,
        capture_intermediates=lambda m, _: isinstance(m, Router), mutable=["intermediates"])
    [lg] = [v[0] for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
            if k[-2] == "router"]
    return lg

  not_taken, real_per_bin = np.zeros(bins), np.zeros(bins)
  top1_counts = np.zeros((cfg.vocab_size, cfg.num_experts), np.int64)
  left_out = seen = 0
  for batch in pulled:
    if seen >= num_tokens:  # the tool reads batches until it has seen num_tokens real tokens
      break
    real = batch["decoder_target_tokens"] > 0
    seen += int(real.sum())
    logits = np.asarray(router_logits(batch), np.float64)  # [8 groups = the 8 rows, 32, 8]
    kept, _ = _numpy_expert_choice(logits, 4)  # cf 1.0: drops
    pos_bin = np.arange(32) * bins // 32
    np.add.at(not_taken, pos_bin, (real & ~kept.any(axis=-1)).sum(axis=0))
    np.add.at(real_per_bin, pos_bin, real.sum(axis=0))
    kept, scores = _numpy_expert_choice(logits, 8)  # cf 2.0, the eval factor: top-1
    top1 = np.where(kept, scores, -1.0).argmax(axis=-1)
    taken = real & kept.any(axis=-1)
    left_out += int((real & ~taken).sum())
    np.add.at(top1_counts, (batch["decoder_input_tokens"][taken], top1[taken]), 1)
  layer = rep["checkpoints"]["2"]["tasks"][task]["layers"][str(cfg.moe_layers[0])]
  drops = layer["drops"]["1.0"]
  assert layer["num_tokens"] == seen and 0 < drops["dropped_fraction"] < 1
  np.testing.assert_allclose(drops["by_position_bin"], not_taken / real_per_bin, atol=1e-9)
  np.testing.assert_allclose(drops["dropped_fraction"], not_taken.sum() / seen)
  assert abs(sum(drops["experts_per_token"]) - 1) < 1e-9 and drops["experts_per_token"][0] > 0
  assert layer["num_tokens_not_taken"] == left_out > 0
  frequent = top1_counts[top1_counts.sum(axis=1) >= min_count]
  spec = layer["token_id_specialisation"]
  assert spec["num_ids"] == len(frequent) > 0 and spec["num_occurrences"] == frequent.sum()
  np.testing.assert_allclose(spec["top1_share"], frequent.max(axis=1).sum() / frequent.sum())
  assert rep["early_routing"]["layers"][str(cfg.moe_layers[0])]["2"]["agreement"] == 1.0
  assert sorted(rep["figures"]) == ["drops_by_position.png", "early_routing.png",
                                    "expert_load.png", "specialisation.png"]
