"""Hugging Face / PyTorch interop: the released OpenMoE layout (spec §6), export and import."""
