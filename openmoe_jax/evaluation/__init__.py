"""Evaluation and decoding: held-out loss, downstream tasks and their metrics, scoring,
autoregressive decoding with a KV cache, and the OpenMoE paper's routing analyses.
"""
