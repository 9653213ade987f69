"""OpenMoE-Chat's prompt template and its "</s>"-as-text stop (XueFuzhao/OpenMoE,
`script/inference_on_multi_devices.py`).

The template is LLaMA-2's with OpenMoE's BOS, the pad id 0:

    <BOS><<SYS>>\\n{system}\\n<</SYS>>\\n\\n<BOS>[INST] {query} [/INST]

The chat model sometimes writes its end of turn as the text "</s>" (the pieces '▁</', 's', '>')
instead of the EOS id; OpenMoE forced EOS after those pieces with a LogitsProcessor and cut the
text at "</s>". Here the pieces are stop sequences on the device and the text is cut on the host.
"""
from typing import List, Sequence, Tuple

from openmoe_jax.data.special_tokens import BOS_ID

EOS_TEXT = "</s>"


def prompt_ids(vocabulary, query: str, system: str = "") -> List[int]:
  """Template ids WITHOUT the leading BOS (decoding adds it)."""
  head = list(vocabulary.encode(f"<<SYS>>\n{system}\n<</SYS>>\n\n"))
  return head + [BOS_ID] + list(vocabulary.encode(f"[INST] {query} [/INST]"))


def stop_sequences(vocabulary) -> List[Tuple[int, ...]]:
  """The token sequences "</s>" becomes after a word, after a space and at the start."""
  found = {tuple(vocabulary.encode(EOS_TEXT))}
  for before in ("a", "a "):
    prefix, whole = list(vocabulary.encode(before)), list(vocabulary.encode(before + EOS_TEXT))
    if whole[:len(prefix)] == prefix:
      found.add(tuple(whole[len(prefix):]))
  return sorted(s for s in found if s)


def cut_at_eos_text(vocabulary, ids: Sequence[int], log_probs: Sequence[float]):
  """(text, ids, log_probs) cut before the first "</s>" of the decoded text, if any."""
  ids = list(ids)
  text = vocabulary.decode(ids)
  if EOS_TEXT not in text:
    return text, ids, list(log_probs)
  text = text.split(EOS_TEXT)[0]
  keep = len(ids)
  while keep and not text.startswith(vocabulary.decode(ids[:keep])):
    keep -= 1
  return text, ids[:keep], list(log_probs[:keep])
