"""OpenMoE's tokenizer for Hugging Face: the SentencePiece model as seqio uses it.

Self-contained (transformers + sentencepiece) so it ships inside an exported folder and loads
with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`. It encodes exactly like
seqio's SentencePieceVocabulary (the fast T5 conversion would collapse runs of spaces, which
changes code tokenization). Ids: pad 0, eos 1, unk 2, then the pieces, then `extra_ids`
sentinels numbered downward from the top (`<extra_id_0>` = vocab_size - 1).

BOS convention: OpenMoE's BOS is the pad id 0. With add_special_tokens (the default) the
tokenizer prepends 0 and appends nothing, as the released OpenMoeTokenizer does.
"""
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class OpenMoeTokenizer(PreTrainedTokenizer):
  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, vocab_file, extra_ids=300, eos_token="</s>", unk_token="<unk>",
               pad_token="<pad>", bos_token="<pad>", **kwargs):
    self.vocab_file = vocab_file
    self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
    self._pieces = self.sp_model.get_piece_size()
    self.extra_ids = extra_ids
    kwargs.setdefault("padding_side", "left")
    super().__init__(eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                     bos_token=bos_token, **kwargs)

  @property
  def vocab_size(self):
    return self._pieces + self.extra_ids

  def get_vocab(self):
    return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

  def _tokenize(self, text, **kwargs):
    return self.sp_model.encode(text, out_type=str)

  def _convert_token_to_id(self, token):
    if token.startswith("<extra_id_") and token.endswith(">"):
      return self.vocab_size - 1 - int(token[len("<extra_id_"):-1])
    return self.sp_model.piece_to_id(token)

  def _convert_id_to_token(self, index):
    if index >= self._pieces:
      return f"<extra_id_{self.vocab_size - 1 - index}>"
    return self.sp_model.id_to_piece(index)

  def convert_tokens_to_string(self, tokens):
    return self.sp_model.decode([t for t in tokens if not t.startswith("<extra_id_")])

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    ids = [self.pad_token_id] + token_ids_0
    return ids if token_ids_1 is None else ids + token_ids_1

  def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
    if already_has_special_tokens:
      return [int(t == self.pad_token_id) for t in token_ids_0]
    return [1] + [0] * len(token_ids_0) + ([0] * len(token_ids_1) if token_ids_1 else [])

  def save_vocabulary(self, save_directory, filename_prefix=None):
    out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                       + "tokenizer.model")
    if os.path.abspath(out) != os.path.abspath(self.vocab_file):
      shutil.copyfile(self.vocab_file, out)
    return (out,)
