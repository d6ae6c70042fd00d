"""litegpt: a training harness for LiteGPT (arXiv 2407.12064) on VinDr-CXR."""

__version__ = "0.1.0"
