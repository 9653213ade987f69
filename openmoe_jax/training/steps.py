"""Pure training and evaluation steps.

State is a small pytree {step, params, opt_state}. The train step does value_and_grad over
microbatches, one optimizer update, and returns float32 metrics; it is jitted once by train.py
with explicit shardings and the state donated.
"""
from typing import Dict

import jax
import jax.numpy as jnp
import optax

from openmoe_jax.model import partitioning as p
from openmoe_jax.model.config import ModelConfig
from openmoe_jax.model.transformer import Transformer, compute_loss
from openmoe_jax.training import expert_bias

# Key of the train step's metrics that is 1.0 when the updated state is all finite; the loop
# reads it before saving and does not log it.
STATE_FINITE = "state_is_finite"


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng, batch_size: int,
               length: int):
  """Boxed (logically annotated) params and optimizer state; run under jit / eval_shape."""
  tokens = jnp.ones((batch_size, length), jnp.int32)
  params = Transformer(cfg).init(rng, tokens)["params"]
  unboxed = jax.tree.map(lambda x: getattr(x, "value", x), params,
                         is_leaf=lambda x: hasattr(x, "value"))
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(expert_bias.trainable(unboxed))}


def param_axes(cfg: ModelConfig) -> Dict[str, tuple]:
  """'/'-joined parameter path -> the logical axis names the model annotates it with (from an
  abstract init: nothing is allocated). The optimizer factors second moments by these."""
  tokens = jax.ShapeDtypeStruct((1, max(cfg.num_experts, 1) * cfg.num_expert_replicas * 2),
                                jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)["params"]
  specs = p.logical_axes(boxed)
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v) for k, v in flat}


def _forward(cfg, params, batch, *, deterministic, rng=None):
  logits, moe = Transformer(cfg).apply(
      {"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
      batch.get("decoder_segment_ids"), batch.get("decoder_positions"),
      deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
  loss, parts = compute_loss(cfg, logits, moe, batch["decoder_target_tokens"],
                             batch["decoder_loss_weights"])
  return loss, logits, parts, moe


def _moe_summary(moe) -> Dict[str, jax.Array]:
  if moe is None:
    return {}
  load = moe.expert_load  # [layers, E]
  cv = jnp.std(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
  return {
      "moe/dropped_fraction": jnp.mean(moe.dropped_fraction),
      "moe/dropped_fraction_per_layer": moe.dropped_fraction,
      "moe/dropped_by_position": jnp.mean(moe.dropped_by_position, axis=0),
      "moe/tokens_left_behind": jnp.mean(moe.tokens_left_behind),
      "moe/expert_load_cv": jnp.mean(cv),
      "moe/expert_load_cv_per_layer": cv,
      "moe/router_confidence": jnp.mean(moe.router_confidence),
  }


# The train step's per-layer expert counts [MoE layers, E] for the loss-free bias (not logged).
_COUNTS = "moe/expert_counts_per_layer"


def train_step(state, batch, *, cfg: ModelConfig, tx, schedule, num_microbatches: int = 1,
               seed: int = 0):
  """One optimizer step over `batch` split into `num_microbatches` (gradients averaged); then,
  with the loss-free bias, the bias update from the step's global expert counts
  (`expert_bias.py`; the optimizer and the gradients never see the bias)."""
  rng = jax.random.fold_in(jax.random.key(seed), state["step"])
  trained, biases = expert_bias.split(state["params"])

  def loss_fn(params, mb, mb_rng):
    loss, _, parts, moe = _forward(cfg, expert_bias.merge(params, biases), mb,
                                   deterministic=False, rng=mb_rng)
    extra = {_COUNTS: moe.expert_counts} if biases else {}
    return loss, {**parts, **_moe_summary(moe), **extra}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(trained, batch, rng)
  else:
    # Microbatch i takes rows i, i+M, i+2M, ...: the split keeps every device's rows on that
    # device (a contiguous split would move the batch-sharded rows between devices or, worse,
    # leave each microbatch unsharded).
    def split_rows(x):
      x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
      x = jnp.swapaxes(x, 0, 1)
      return p.constrain(x, (None, p.BATCH) + (None,) * (x.ndim - 2))
    split = jax.tree.map(split_rows, batch)

    def body(carry, xs):
      mb, i = xs
      mb = jax.tree.map(lambda x: p.constrain(x, (p.BATCH,) + (None,) * (x.ndim - 1)), mb)
      (_, m), g = grad_fn(trained, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(lambda: grad_fn(trained, jax.tree.map(lambda x: x[0], split), rng))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
    (grads, metrics), _ = jax.lax.scan(body, zeros, (split, jnp.arange(num_microbatches)))
    grads, metrics = jax.tree.map(lambda x: x / num_microbatches, (grads, metrics))
  updates, opt_state = tx.update(grads, state["opt_state"], trained)
  params = optax.apply_updates(trained, updates)
  if biases:
    biases = expert_bias.updated(biases, metrics.pop(_COUNTS), cfg.expert_bias_update_rate,
                                 cfg.moe_layers)
    metrics["moe/expert_bias_abs_max"] = expert_bias.abs_max(biases)
    params = expert_bias.merge(params, biases)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                 # asarray: optax's constant schedule returns a Python float.
                 learning_rate=jnp.asarray(schedule(state["step"]), jnp.float32))
  metrics["num_tokens"] = metrics["num_tokens"] * num_microbatches
  # Checked on the host before any checkpoint is written: the loss above is the one from before
  # this update, so only the updated state itself can say whether it is safe to save.
  metrics[STATE_FINITE] = all_finite((params, opt_state))
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def all_finite(tree) -> jax.Array:
  """bool[]: every floating-point leaf of `tree` is finite (no NaN, no inf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def eval_step(params, batch, *, cfg: ModelConfig):
  """Sums for loss / perplexity / accuracy under the eval routing settings (eval cf)."""
  _, logits, parts, moe = _forward(cfg, params, batch, deterministic=True)
  w = batch["decoder_loss_weights"].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch["decoder_target_tokens"]).astype(jnp.float32)
  out = {"weight": jnp.sum(w), "ce_sum": parts["cross_entropy"] * parts["num_tokens"],
         "correct": jnp.sum(correct * w)}
  if moe is not None:
    out["dropped_fraction"] = jnp.mean(moe.dropped_fraction)
  return out


def token_log_probs(params, batch, *, cfg: ModelConfig):
  """log p(target_t | tokens < t) for every position, eval routing. float32[B, L]."""
  _, logits, _, _ = _forward(cfg, params, batch, deterministic=True)
  logp = jax.nn.log_softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(batch["decoder_target_tokens"], logits.shape[-1], dtype=logp.dtype)
  return jnp.einsum("blv,blv->bl", logp, one_hot)
