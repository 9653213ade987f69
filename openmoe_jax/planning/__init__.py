"""Planning: TPU slices without a TPU, the training step compiled by XLA:TPU for a slice
(memory, compiler-estimated time, collectives), and HLO statistics.
"""
