"""Per-token log-probabilities of text lines under a model, one line at a time (the library behind
`openmoe-score`).
"""

from openmoe_jax.errors import UsageError
from openmoe_jax.training import steps


def read_text_lines(path: str) -> list:
  """The file's lines without line ends; UsageError naming the file, line and byte offset of
  the first line that is not UTF-8."""
  lines = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        lines.append(raw.decode("utf-8").rstrip("\r\n"))
      except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} "
                                   f"at column {e.start + 1})") from None
  return lines


def check_lengths(lines, vocabulary, budget: int, path: str) -> None:
  """UsageError naming the first line longer than `budget` tokens: a model scores the lengths
  it was trained at (its memory grows with the line), so a longer line is refused, as
  openmoe-infer refuses a prompt over its budget."""
  for number, line in enumerate(lines, 1):
    n = len(vocabulary.encode(line))
    if n > budget:
      raise UsageError(f"{path}:{number}: {n} tokens, over the length budget {budget} (the "
                       "run's training length; --max_length sets another)")


def score_lines(cfg, params, vocabulary, lines):
  """Yields (ids, log_probs) per line."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  fn = jax.jit(lambda p, b: steps.token_log_probs(p, b, cfg=cfg))
  multiple = max(cfg.num_experts, 1) * cfg.num_expert_replicas
  for line in lines:
    ids = list(vocabulary.encode(line))
    n = len(ids)
    # Power-of-two buckets bound recompilation; the group rule needs a multiple of E.
    length = max(multiple, 1 << (max(n, 1) - 1).bit_length())
    length = -(-length // multiple) * multiple
    targets = np.zeros((1, length), np.int32)
    targets[0, :n] = ids
    inputs = np.zeros_like(targets)
    inputs[0, 1:n] = ids[:n - 1] if n > 1 else []
    batch = {"decoder_input_tokens": jnp.asarray(inputs), "decoder_target_tokens": jnp.asarray(targets),
             "decoder_loss_weights": jnp.asarray(targets > 0, jnp.float32)}
    logp = np.asarray(fn(params, batch))[0, :n]
    yield ids, [float(x) for x in logp]
