"""The network and its weights: configs, encoders, the LiteGPT module, input assembly, MiniGPT-v2 import,
export, the tiny preset's weight writers, the model summary.

Imports only the shared vocabulary (labels, grammar, boxes); never the data pipeline.
"""
