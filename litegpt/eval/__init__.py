"""A trained stage at work: inference (load an export, generate), evaluation, metrics, report, predict,
and the training-prior baseline.

Builds on data, model and the feature cache; never imports training.
"""
