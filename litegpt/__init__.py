"""litegpt: a training harness for LiteGPT (arXiv 2407.12064) on VinDr-CXR.

The package follows the data flow (raw -> shards -> features -> train -> export -> eval), in layers that
import only downwards (tests/test_layout.py checks it):

    labels, grammar, boxes, distributed   shared vocabulary and the rank environment
    data/                                 raw DICOM + CSV -> shards (prepare, synth, inspection)
    model/                                configs, encoders, the network, inputs, export, tiny preset
    features                              the frozen-encoder feature cache (image shards x encoders)
    train/                                one training stage (recipe, stream, optimizer, checkpoints, Trainer)
    eval/                                 inference, evaluation, metrics, report, predict, baseline
    demo, cli                             the whole pipeline; the `litegpt` command

`data` and `model` do not import each other; neither do `train` and `eval`.
"""

__version__ = "0.1.0"
