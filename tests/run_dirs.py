"""A MODEL_DIR as openmoe-train writes it, made directly (no training): model_config.json,
run.json and one checkpoint of freshly initialised parameters. Shared by the tools' tests."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.model import partitioning
from openmoe_jax.model.transformer import Transformer
from openmoe_jax.training import checkpoint as ckpt_lib
from openmoe_jax.training import run_dir as run_dir_lib


def make_run_dir(d, cfg, *, step, seed, run=None):
  """Writes a run directory at `d` (created) whose checkpoint `step` holds the parameters of
  `Transformer(cfg)` initialised with `seed` (no optimizer state); returns `d`."""
  params = partitioning.unbox(
      Transformer(cfg).init(jax.random.key(seed), jnp.ones((1, 16), jnp.int32))["params"])
  os.makedirs(d)
  run_dir_lib.write_model_config(str(d), cfg)
  (d / "run.json").write_text(json.dumps(run or {"mixture_or_task_name": "builtin_corpus_full_lm"}))
  with ckpt_lib.Checkpointer(d, async_save=False) as c:
    c.save(step, {"step": np.int32(step), "params": params, "opt_state": {}}, {}, force=True)
  return d
