"""Hugging Face / PyTorch interop: the released OpenMoE layout (hpcaitech/ColossalAI `examples/language/openmoe/model/convert_openmoe_ckpt.py`), export and import."""
