#!/usr/bin/env bash
# Rerun every benchmark (CPU figures; on a GPU machine add --preset paper where a script offers it) and
# print the tables that docs/BENCHMARKS.md records. Usage: bash benchmarks/run_all.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export HF_HUB_OFFLINE=1
echo "## prepare";          "$PY" benchmarks/prepare.py --images 40
echo "## feature cache";    "$PY" benchmarks/features.py
echo "## train step";       OMP_NUM_THREADS=1 "$PY" benchmarks/train_step.py --preset tiny --micro-batch 4,16
echo "## generation";       "$PY" benchmarks/generate.py --threads 1 --images 32
