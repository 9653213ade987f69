"""The special token ids of OpenMoE's (and T5's) vocabularies, the one place they are written.

Padding and the decoder's start token share id 0 (t5x decodes from BOS = PAD = 0); the sequence
ends with EOS = 1; unknown pieces are 2 (the umt5 SentencePiece model and the built-in corpus's).
A module of its own, with no imports, so the decoder, the chat template and the Hugging Face
export take the ids without loading seqio and TensorFlow (`vocab.py` does).
"""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = PAD_ID
