"""One training stage: recipe, data stream, optimizer, checkpoints, monitoring and the Trainer.

Builds on data, model and the feature cache; never imports evaluation.
"""
