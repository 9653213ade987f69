"""Interop: Hugging Face (export, import, the PyTorch model shipped with exports) and OpenMoE's t5x
checkpoints.
"""
