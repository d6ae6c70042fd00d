"""Shared fixtures. Heavy artefacts (the synthetic dataset, its shards) are built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
