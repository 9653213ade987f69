"""Every gin file parses, finalises and initialises with tiny overrides; openmoe-info counts."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import gin_utils
from openmoe_jax.model import counts
from openmoe_jax.commands import configurables  # noqa: F401  registers `train` for the run gins
from openmoe_jax.model.transformer import Transformer

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"
GIN_FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))
TINY = ["EMBED_DIM = 16", "NUM_HEADS = 2", "HEAD_DIM = 8", "MLP_DIM = 16", "NUM_EMBEDDINGS = 64",
        "NUM_EXPERTS = 4", "GROUP_SIZE = 16", "NUM_KV_HEADS = 1", "NUM_SELECTED_EXPERTS = 2"]
TINY_MLA = ["NUM_KV_HEADS = 0", "KV_LORA_RANK = 8", "QK_ROPE_HEAD_DIM = 4", "V_HEAD_DIM = 6",
            "EXPERT_MLP_DIM = 16", "FIRST_K_DENSE_LAYERS = 2", "NUM_EXPERT_GROUPS = 2",
            "TOPK_GROUPS = 1"]
# Macros a run gin leaves %gin.REQUIRED, bound as a user would on the command line.
RUN_REQUIRED = ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'builtin_corpus_full_lm'",
                "TASK_FEATURE_LENGTHS = {'targets': 16}", "TRAIN_STEPS = 1", "BATCH_SIZE = 2",
                "INITIAL_CHECKPOINT_DIR = '/tmp/unused'", "UMT5_SPM_PATH = '/tmp/unused.model'"]


def test_gin_files_found():
  assert {"models/openmoe_base.gin", "models/openmoe_8b.gin", "models/openmoe_34b.gin",
          "models/tiny.gin", "models/small.gin"} <= set(GIN_FILES)


# The routing designs (gin/routing/) train and round-trip in test_routing_designs.py instead.
@pytest.mark.parametrize("gin_file", [f for f in GIN_FILES if not f.startswith("routing/")])
def test_gin_file_parses_finalizes_and_initializes(gin_file):
  text = (GIN_DIR / gin_file).read_text()
  bindings = list(TINY) + ["NUM_DECODER_LAYERS = 4", "NUM_DECODER_SPARSE_LAYERS = 2"]
  if "KV_LORA_RANK" in text:  # DeepSeek: latent attention (one key/value head per head), groups
    bindings += TINY_MLA + ([] if "Q_LORA_RANK = 0 " in text else ["Q_LORA_RANK = 8"])
  if gin_file == "runs/eval.gin":  # no model: it reads MODEL_DIR/model_config.json
    gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/tmp/unused'"])
    return
  # run settings only: combine with a model gin, as users do
  files = ["models/tiny.gin", gin_file] if gin_file.startswith("runs/") else [gin_file]
  if "include 'runs/" in text or gin_file.startswith("runs/"):
    # Bind exactly the macros this file leaves required: binding others is refused as unused.
    gin_utils.parse_gin(files, bindings, finalize=False)
    required = set(gin_utils.missing_required())
    bindings += [b for b in RUN_REQUIRED if b.split(" =")[0] in required]
  gin_utils.parse_gin(files, bindings)
  cfg = gin_utils.model_config()
  tokens = jnp.ones((2, 8), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(0), tokens)
  logits, _ = Transformer(cfg).apply(params, tokens)
  assert logits.shape == (2, 8, 64) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("gin_file,total,moe_layers", [
    ("models/openmoe_base.gin", 799_663_104, [3, 7, 11]),
    ("models/openmoe_8b.gin", 11_855_046_656, [5, 11, 17, 23]),
    ("models/openmoe_34b.gin", 46_270_737_408, [3, 7, 11, 15, 19, 23, 27, 31]),
])
def test_openmoe_sizes_match_the_layer_shapes(gin_file, total, moe_layers):
  gin_utils.parse_gin([gin_file], [])
  cfg = gin_utils.model_config()
  s = counts.summarize(cfg)
  # Independent count from the layer shapes of OpenMoE's released configs.
  d, a, f, e = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.num_experts
  n_moe = len(moe_layers)
  per_layer = 4 * d * a + 4 * d * f + 2 * d
  want = (cfg.num_layers * per_layer + n_moe * (e * 4 * d * cfg.expert_mlp_dim + d * e + d)
          + 2 * cfg.vocab_size * d + d)
  assert s["total_params"] == want == total
  assert s["moe_layers"] == moe_layers
  assert s["embedding_params"] == 2 * cfg.vocab_size * d
  inactive = n_moe * (e - 2) * 4 * d * cfg.expert_mlp_dim
  assert s["activated_params"] == total - inactive
  assert s["train_flops_per_token"] > 6 * (s["activated_params_without_embeddings"])


def test_info_cli_prints_json_and_fails_cleanly():
  run = lambda *a: subprocess.run([sys.executable, "-m", "openmoe_jax.commands.info", *a],
                                  capture_output=True, text=True, timeout=120)
  ok = run("--gin_file=models/tiny.gin", "--gin.NUM_EXPERTS=16", "--gin.GROUP_SIZE=32")
  assert ok.returncode == 0, ok.stderr
  out = json.loads(ok.stdout)
  assert out["num_experts"] == 16 and out["moe_layers"] == [1]
  for key in ("total_params", "activated_params", "embedding_params", "train_flops_per_token"):
    assert isinstance(out[key], int) and out[key] > 0
  bad = run("--gin_file=models/tiny.gin", "--gin.NUM_SELECTED_EXPERTS=9")
  assert bad.returncode == 2 and "num_selected_experts" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
  missing = run("--gin_file=models/nope.gin")
  assert missing.returncode == 2 and "nope.gin" in missing.stderr
  helptext = run("--help")
  assert helptext.returncode == 0 and "--gin_file" in helptext.stdout


def test_a_macro_set_on_the_command_line_but_used_nowhere_is_refused():
  with pytest.raises(gin_utils.UsageError, match="used by no gin file: CAPACITY_MOD, FOO"):
    gin_utils.parse_gin(["models/tiny.gin"], ["CAPACITY_MOD = 'dropless'", "FOO = 1",
                                              "CAPACITY_MODE = 'dropless'"])
  gin_utils.parse_gin(["models/tiny.gin"], ["CAPACITY_MODE = 'dropless'"])  # used: fine
  assert gin_utils.model_config().capacity_mode == "dropless"


@pytest.mark.parametrize("gin_files", [["quickstart.gin"],
                                       ["models/tiny.gin", "runs/finetune.gin"]])
def test_info_accepts_run_gins(gin_files):
  # A fresh process: this module imports `train`, which the CLI must register itself.
  r = subprocess.run([sys.executable, "-m", "openmoe_jax.commands.info",
                      *[f"--gin_file={f}" for f in gin_files]],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout)["num_experts"] == 8  # small.gin and tiny.gin: 8 experts
