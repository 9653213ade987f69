"""Training: the loop, the pure train and eval steps, optimizers, checkpoints and resume, the run
directory and its lock, the training state's layout on the mesh, metrics and the console.
"""
